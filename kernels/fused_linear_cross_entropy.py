"""Fused linear cross-entropy: the loss of ``hidden @ weight.T`` without ever holding all the logits.

For rows ``i`` (tokens) with hidden state ``h_i`` and label ``y_i``, the logits are
``x_i = W h_i (+ b)``, optionally soft-capped as in Gemma 2/3: ``z_i = c * tanh(x_i / c)``.
With ``lse_i = log sum_j exp(z_ij)``, ``V`` the vocabulary size and ``eps`` the label smoothing::

    loss_i = (1 - eps) * (lse_i - z_{i,y_i}) + eps * (lse_i - mean_j z_ij)

which is exactly what ``F.cross_entropy(z, y, label_smoothing=eps)`` computes per row. Rows whose label
is ``ignore_index`` contribute nothing; ``mean`` divides the sum by the number of kept rows (torch
does the same; with every row ignored torch returns nan, this op returns 0 so that a fully masked
micro-batch cannot poison a run). The gradient with respect to the logits is::

    d loss_i / d z_ij = softmax(z_i)_j - (1 - eps) * [j == y_i] - eps / V
    d z_ij / d x_ij   = 1 - tanh(x_ij / c)^2          (soft-capping only)

The rows are processed in chunks (Liger-Kernel's FusedLinearCrossEntropy is the model,
https://arxiv.org/abs/2410.10989): per chunk, the logits are computed, a Triton kernel (CUDA or
``TRITON_INTERPRET=1``) or in-place torch ops (CPU path) overwrite them with ``d loss / d x``, and that
gradient is projected straight away: ``grad_h[chunk] = dx @ W`` and ``grad_W += dx.T @ h[chunk]``.
So the forward pass already holds the gradients, and backward only scales them by ``grad_output``
(``reduction="none"`` cannot do that, since grad_W must weight each row before summing: it keeps the
inputs and recomputes chunk by chunk in backward instead).
Peak memory is one chunk of fp32 logits plus the gradients, instead of several ``rows x V`` tensors.
Logits, their gradient and the weight-gradient accumulator are fp32 whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from tunegraph.errors import TunegraphError
from tunegraph.kernels.dispatch import triton_available, use_triton

REDUCTIONS = ("mean", "sum", "none")
# Fewest rows per chunk (unless there are fewer rows). Each chunk reads W twice (logits, grad_h) and
# reads and writes grad_W, ~4 x V x H memory traffic whatever its size; Liger's rule alone gives chunks
# of a few rows at large vocabularies and that traffic then dominates, most of all on CPU. Measured on
# a 2-core CPU, Gemma 3 head (H=640, V=262,144), 512 rows, fwd+bwd against the unfused loss: 4 rows a
# chunk took 6x the time, 16 rows 2.1x, 64 rows 1.1x, 256 rows 0.8x (fastest of 3, interleaved, on a
# machine shared with other jobs, so roughly). 256 rows of fp32 logits are
# 256 MiB at that vocabulary, 48 MiB at SmolLM2's.
MIN_CHUNK_ROWS = 256
# Largest vocabulary block a Triton program holds at once (Liger's MAX_FUSED_SIZE).
MAX_BLOCK_SIZE = 32768


@dataclass(frozen=True)
class CrossEntropyOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float | None = None
    reduction: str = "mean"

    def validate(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise TunegraphError(f"cross-entropy reduction={self.reduction!r}: use one of {', '.join(REDUCTIONS)}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise TunegraphError(f"cross-entropy label_smoothing={self.label_smoothing}: must lie in [0, 1]")
        if self.softcap is not None and not self.softcap > 0:
            raise TunegraphError(f"cross-entropy softcap={self.softcap}: must be > 0, or None for no soft-capping")


# --- Triton kernel: one program per row, two passes over the vocabulary -----------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        # exp form: libdevice.tanh does not run under TRITON_INTERPRET; saturates cleanly to +-1.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr, row_stride, labels_ptr, row_scale_ptr, loss_ptr,
        n_cols, ignore_index, label_smoothing, softcap,
        HAS_SOFTCAP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * row_stride overflows int32 at large V
        logits_ptr += row * row_stride
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + tl.arange(0, BLOCK_SIZE)
                tl.store(logits_ptr + cols, 0.0, mask=cols < n_cols)
            tl.store(loss_ptr + row, 0.0)
            return

        # pass 1: online log-sum-exp (running max, rescaled sum) and the sum of logits for smoothing
        z_label = tl.load(logits_ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        running_max = float("-inf")
        sum_exp = 0.0
        sum_z = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, 0))
            sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
            running_max = new_max
            sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        lse = running_max + tl.log(sum_exp)
        loss = (1.0 - label_smoothing) * (lse - z_label) + label_smoothing * (lse - sum_z / n_cols)
        tl.store(loss_ptr + row, loss)

        # pass 2: overwrite the logits with scale * d loss / d logits
        scale = tl.load(row_scale_ptr + row)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                capped = _tanh(z / softcap)
                z = softcap * capped
            grad = tl.exp(z - lse) - label_smoothing / n_cols
            grad = tl.where(cols == label, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - capped * capped)
            tl.store(logits_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def triton_block_size(n_cols: int) -> int:
    return min(MAX_BLOCK_SIZE, 1 << max(0, n_cols - 1).bit_length())


def _cross_entropy_chunk_triton(
    logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, options: CrossEntropyOptions
) -> torch.Tensor:
    """Per-row losses of a contiguous fp32 logits chunk; the logits become ``row_scale * dloss/dlogits``."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = triton_block_size(n_cols)
    _cross_entropy_rows_kernel[(n_rows,)](
        logits, logits.stride(0), labels, row_scale, losses,
        n_cols, options.ignore_index, float(options.label_smoothing), float(options.softcap or 1.0),
        # Liger launches its 32k-wide blocks with 32 warps; untuned here (no GPU on the dev machines)
        HAS_SOFTCAP=options.softcap is not None, BLOCK_SIZE=block, num_warps=32 if block >= 8192 else 8,
    )
    return losses


# --- CPU path: the same two passes as whole-chunk torch ops, in place --------------------------------

def _cross_entropy_chunk_torch(
    logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, options: CrossEntropyOptions
) -> torch.Tensor:
    """Same contract as the Triton launcher; at most one extra chunk-sized buffer (soft-capping)."""
    eps, cap, n_cols = options.label_smoothing, options.softcap, logits.shape[1]
    kept = labels != options.ignore_index
    safe_labels = torch.where(kept, labels, 0).unsqueeze(1)
    z = logits
    if cap is not None:
        z.div_(cap).tanh_()
        tanh_derivative = torch.square(z).neg_().add_(1.0)
        z.mul_(cap)
    z_label = z.gather(1, safe_labels).squeeze(1)
    mean_z = z.mean(1) if eps > 0 else None
    row_max = z.amax(1, keepdim=True)
    probs = z.sub_(row_max).exp_()
    sum_exp = probs.sum(1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    losses = lse - z_label
    if eps > 0:
        losses = (1.0 - eps) * losses + eps * (lse - mean_z)
    grad = probs.div_(sum_exp)
    if eps > 0:
        grad.sub_(eps / n_cols)
    grad.scatter_add_(1, safe_labels, torch.full_like(z_label, eps - 1.0).unsqueeze(1))
    if cap is not None:
        grad.mul_(tanh_derivative)
    grad.mul_((row_scale * kept).unsqueeze(1))
    return losses * kept


# --- chunk loop shared with fused_linear_jsd ----------------------------------------------------------

def default_chunk_rows(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk: Liger's rule (a chunk's logits about as large as the whole ``rows x H`` input),
    raised to ``MIN_CHUNK_ROWS``, never above ``n_rows``."""
    liger_rows = math.ceil(n_rows / math.ceil(vocab_size / hidden_size))
    return max(1, min(n_rows, max(liger_rows, MIN_CHUNK_ROWS)))


def check_chunk_rows(chunk_rows: int | None, n_rows: int, hidden_size: int, vocab_size: int) -> int:
    if chunk_rows is None:
        return default_chunk_rows(n_rows, hidden_size, vocab_size)
    if chunk_rows < 1:
        raise TunegraphError(f"chunk_rows={chunk_rows}: must be >= 1, or None for the memory-based default")
    return min(chunk_rows, max(n_rows, 1))


def logits_into(
    buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """fp32 logits of ``hidden`` written into the front rows of a reused fp32 ``buffer``."""
    out = buffer[: hidden.shape[0]]
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
    else:  # matmul in the input dtype (as the unfused model would), then widen
        out.copy_(hidden @ weight.t())
    if bias is not None:
        out.add_(bias.float())
    return out


@dataclass
class LinearGrads:
    """Gradients of a ``hidden @ weight.T + bias`` head, filled chunk by chunk (None where not needed)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None  # fp32 accumulator, cast to the weight's dtype by ``finished``
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, hidden, weight, bias, needs: tuple[bool, bool, bool]) -> LinearGrads:
        return cls(
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None,
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] and bias is not None else None,
        )

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add_chunk(self, rows: slice, dlogits: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor) -> None:
        """Project a chunk's fp32 ``d loss / d logits`` onto the hidden states, the weight and the bias."""
        if self.hidden is not None:
            torch.mm(dlogits.to(weight.dtype), weight, out=self.hidden[rows])
        if self.weight is not None:  # fp32 product: bf16 inputs still accumulate exactly across chunks
            self.weight.addmm_(dlogits.t(), hidden_chunk.float())
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0))

    def finished(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearGrads:
        return LinearGrads(
            self.hidden,
            None if self.weight is None else self.weight.to(weight.dtype),
            None if self.bias is None else self.bias.to(bias.dtype),
        )


def _chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    row_scale: torch.Tensor, options: CrossEntropyOptions, chunk_rows: int, grads: LinearGrads,
) -> torch.Tensor:
    """Unscaled per-row losses; ``grads`` (if any) receive the gradient of ``sum_i row_scale_i * loss_i``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk_loss = _cross_entropy_chunk_triton if use_triton(hidden, weight) else _cross_entropy_chunk_torch
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    buffer = torch.empty(min(chunk_rows, n_rows), vocab, dtype=torch.float32, device=hidden.device)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        logits = logits_into(buffer, hidden[rows], weight, bias)
        losses[rows] = chunk_loss(logits, labels[rows], row_scale[rows], options)
        if grads.any:
            grads.add_chunk(rows, logits, hidden[rows], weight)
    return losses


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and (for mean/sum) the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options: CrossEntropyOptions, chunk_rows: int, compute_grads: bool):
        kept = (labels != options.ignore_index).float()
        if options.reduction == "none":
            # grad_W = sum_i g_i dx_i^T h_i needs each row's upstream g_i before the sum over rows,
            # so "none" keeps the inputs and recomputes chunk by chunk in backward.
            no_grads = LinearGrads(None, None, None)
            losses = _chunked_cross_entropy(hidden, weight, bias, labels, kept, options, chunk_rows, no_grads)
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.options, ctx.chunk_rows = options, chunk_rows
            return losses
        row_scale = kept / kept.sum().clamp(min=1.0) if options.reduction == "mean" else kept
        needs = ctx.needs_input_grad[:3] if compute_grads else (False, False, False)
        grads = LinearGrads.zeros(hidden, weight, bias, needs)
        losses = _chunked_cross_entropy(hidden, weight, bias, labels, row_scale, options, chunk_rows, grads)
        grads = grads.finished(weight, bias)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.options = options
        return (losses * row_scale).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.options.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            row_scale = grad_output.float() * (labels != ctx.options.ignore_index)
            grads = LinearGrads.zeros(hidden, weight, bias, ctx.needs_input_grad[:3])
            _chunked_cross_entropy(hidden, weight, bias, labels, row_scale, ctx.options, ctx.chunk_rows, grads)
            grads = grads.finished(weight, bias)
            return grads.hidden, grads.weight, grads.bias, None, None, None, None
        scaled = [None if g is None else scale_by_upstream(g, grad_output) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None)


def scale_by_upstream(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    # The usual upstream gradient is exactly 1 (loss.backward()): skip a pass over V x H then.
    if torch.equal(grad_output, torch.ones_like(grad_output)):
        return grad
    return grad * grad_output.to(grad.dtype)


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise TunegraphError(
            f"fused linear loss: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
            "expected hidden [..., H] and weight [V, H]"
        )
    if hidden.dtype != weight.dtype:
        raise TunegraphError(
            f"fused linear loss: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other"
        )
    if labels.shape != hidden.shape[:-1]:
        raise TunegraphError(
            f"fused linear loss: labels {tuple(labels.shape)} must have hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise TunegraphError(f"fused linear loss: bias {tuple(bias.shape)} must have shape ({weight.shape[0]},)")


def check_label_range(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    # The kernel reads logits[label] unchecked: refuse out-of-range labels (as F.cross_entropy does).
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise TunegraphError(
            f"fused linear loss: label {int(labels[bad][0])} outside [0, {vocab_size}) "
            f"and not ignore_index={ignore_index}"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias), labels)`` without the full logits.

    ``hidden`` is ``[..., H]``, ``weight`` ``[V, H]``, ``labels`` ``hidden``'s leading shape. Gradients
    flow to ``hidden``, ``weight`` and ``bias`` when they require grad (a frozen head costs no grad_W).
    ``reduction="none"`` returns per-row losses shaped like ``labels`` (0 on ignored rows).
    ``chunk_rows`` overrides the number of rows per chunk (see ``default_chunk_rows``).
    """
    options = CrossEntropyOptions(ignore_index, float(label_smoothing), softcap, reduction)
    options.validate()
    _check_inputs(hidden, weight, labels, bias)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).contiguous()
    check_label_range(flat_labels, ignore_index, weight.shape[0])
    rows = check_chunk_rows(chunk_rows, flat_hidden.shape[0], weight.shape[1], weight.shape[0])
    compute_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss = FusedLinearCrossEntropyFunction.apply(
        flat_hidden, weight, bias, flat_labels, options, rows, compute_grads
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``log softmax(hidden @ weight.T)[label]`` per row (0 on ignored rows), differentiable, chunked."""
    return -fused_linear_cross_entropy(
        hidden, weight, labels, bias,
        ignore_index=ignore_index, softcap=softcap, reduction="none", chunk_rows=chunk_rows,
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain torch: full logits (fp32) then ``F.cross_entropy``; what the fused op must reproduce."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
    ).reshape(labels.shape if reduction == "none" else ())
