"""RMSNorm as one fused op: Triton kernels (CUDA), a memory-saving torch path (CPU), the torch reference.

Math, per row ``x`` of ``n`` features (https://arxiv.org/abs/1910.07467):

    rstd = 1 / sqrt(mean(x²) + eps)          always in fp32
    x̂    = x · rstd
    llama: y = w · cast(x̂)                   cast to x's dtype first, then the product in the promoted dtype
    gemma: y = cast(x̂ · (1 + w))             everything in fp32, one cast to x's dtype at the end

(``LlamaRMSNorm``/``Qwen2RMSNorm`` and ``Gemma3RMSNorm`` of transformers 5.23, see
https://github.com/huggingface/transformers/pull/29402 for why the two cast differently.)

Backward, with ``w_eff = w`` (llama) or ``1 + w`` (gemma) and ``g = dy · w_eff``:

    dx = rstd · (g − x̂ · mean(g · x̂))
    dw = Σ_rows dy · x̂                        (llama: x̂ cast to x's dtype, as the forward used it)

Both paths save only ``x``, ``w`` and one fp32 ``rstd`` per row, and recompute ``x̂`` in the backward
(the reference keeps fp32 copies of ``x`` and ``x̂`` alive until the backward).
"""

from __future__ import annotations

from typing import Literal

import torch

from tunegraph.kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform: only the torch path runs (see dispatch)
    triton = None

CastingMode = Literal["llama", "gemma"]
CASTING_MODES = ("llama", "gemma")

# The CPU path works on slices of about this many elements, so its fp32 temporaries stay small.
_CHUNK_ELEMENTS = 1 << 18


# ---------------------------------------------------------------------------------------------
# Triton kernels: one program per row in the forward; in the backward each program walks a block
# of rows and keeps its share of dw in registers (summed over programs on the host).

if triton is not None:

    @triton.jit
    def _rms_norm_forward_kernel(
        Y, y_row_stride, X, x_row_stride, W, RSTD, n_cols, eps,
        GEMMA: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        x_hat = x * rstd
        if GEMMA:
            y = x_hat * (1.0 + w)
        else:
            # the product of two values of x's dtype is exact in fp32, so rounding once at the store
            # gives what torch's `w * x̂.to(dtype)` gives
            y = w * x_hat.to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_backward_kernel(
        DX, dx_row_stride, DY, dy_row_stride, X, x_row_stride, W, RSTD,
        DW_PARTIAL, n_rows, n_cols, rows_per_program,
        GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        program = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        w_eff = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            w_eff = w_eff + 1.0
        dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        row_start = program * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_end):
            x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd  # recomputed rather than saved
            g = dy * w_eff
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
            tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if GEMMA:
                    dw += dy * x_hat
                else:
                    dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + program * n_cols + cols, dw, mask=mask)


def _block_size(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _backward_programs(x: torch.Tensor, n_rows: int) -> int:
    """One program per streaming multiprocessor on CUDA (each keeps a dw row); a few in the interpreter."""
    if x.is_cuda:
        return min(n_rows, torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(n_rows, 4)


def _triton_forward(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    n_rows, n_cols = x.shape
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _rms_norm_forward_kernel[(n_rows,)](
        y, y.stride(0), x, x.stride(0), weight, rstd, n_cols, eps,
        GEMMA=gemma, BLOCK_SIZE=_block_size(n_cols),
    )
    return rstd


def _triton_backward(dx, dy, x, weight, rstd, gemma: bool, need_dw: bool) -> torch.Tensor | None:
    n_rows, n_cols = x.shape
    programs = _backward_programs(x, n_rows)
    # without dw the kernel never touches DW_PARTIAL; rstd stands in as a valid pointer
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if need_dw else rstd
    _rms_norm_backward_kernel[(programs,)](
        dx, dx.stride(0), dy, dy.stride(0), x, x.stride(0), weight, rstd,
        dw_partial, n_rows, n_cols, triton.cdiv(n_rows, programs),
        GEMMA=gemma, COMPUTE_DW=need_dw, BLOCK_SIZE=_block_size(n_cols),
    )
    return dw_partial.sum(0) if need_dw else None


# ---------------------------------------------------------------------------------------------
# The torch path: the reference's arithmetic, op for op, on row chunks, writing into the output.


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    return (slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step))


def _torch_forward(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    n_rows, n_cols = x.shape
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    w_eff = 1.0 + weight.float() if gemma else weight
    for rows in _row_chunks(n_rows, n_cols):
        x32 = x[rows].float()
        torch.rsqrt(x32.pow(2).mean(-1).add_(eps), out=rstd[rows])
        x_hat = x32 * rstd[rows, None]
        if gemma:
            torch.mul(x_hat, w_eff, out=y[rows])  # fp32 product, cast once on the write
        else:
            torch.mul(w_eff, x_hat.to(x.dtype), out=y[rows])
    return rstd


def _torch_backward(dx, dy, x, weight, rstd, gemma: bool, need_dw: bool) -> torch.Tensor | None:
    n_rows, n_cols = x.shape
    w_eff = weight.float() + 1.0 if gemma else weight.float()
    dw = torch.zeros(n_cols, dtype=torch.float32, device=x.device) if need_dw else None
    for rows in _row_chunks(n_rows, n_cols):
        rstd_rows = rstd[rows, None]
        x_hat = x[rows].float() * rstd_rows  # recomputed rather than saved
        dy32 = dy[rows].float()
        if need_dw:
            used = x_hat if gemma else x_hat.to(x.dtype).float()
            dw += (dy32 * used).sum(0)
        g = dy32 * w_eff
        dot = (g * x_hat).mean(-1, keepdim=True)
        # dx = rstd · (g − x̂ · dot), in place on this chunk's own temporaries
        g.sub_(x_hat.mul_(dot)).mul_(rstd_rows)
        dx[rows] = g
    return dw


# ---------------------------------------------------------------------------------------------
# Layout: rows are independent, so any dense tensor whose last dim is innermost (e.g. q after
# `.transpose(1, 2)`) can be processed as a (rows, n) matrix over its own memory, in memory order.


def _row_view(t: torch.Tensor) -> torch.Tensor | None:
    """A (rows, n) view of ``t``'s memory if ``t`` is dense with its last dim innermost, else None."""
    n = t.shape[-1]
    if t.numel() == 0 or t.stride(-1) != 1:
        return None
    expected = n
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim() - 1) if t.shape[d] != 1):
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel() // n, n), (n, 1))


def _rows_like(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``t``'s rows in ``layout``'s memory order (no copy when the strides already agree)."""
    if t.stride() != layout.stride():
        t = torch.empty_like(layout, dtype=t.dtype).copy_(t)
    return _row_view(t)


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm; Triton or torch per call (see ``tunegraph.kernels.dispatch``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, mode: CastingMode) -> torch.Tensor:
        if _row_view(x) is None:
            x = x.contiguous()
        gemma = mode == "gemma"
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty_like(x, dtype=out_dtype)  # same strides as x, so its rows line up with x's
        ctx.triton = use_triton(x, weight)
        forward = _triton_forward if ctx.triton else _torch_forward
        rstd = forward(_row_view(y), _row_view(x), weight.contiguous(), eps, gemma)
        ctx.gemma = gemma
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dx = torch.empty_like(x)
        backward = _triton_backward if ctx.triton else _torch_backward
        dw = backward(_row_view(dx), _rows_like(dy, x), _row_view(x), weight.contiguous(), rstd, ctx.gemma, need_dw)
        return dx, (dw.to(weight.dtype) if need_dw else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: CastingMode = "llama") -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` with ``mode``'s casting (see the module docstring)."""
    if mode not in CASTING_MODES:
        raise ValueError(f"RMSNorm casting mode must be one of {CASTING_MODES}, got {mode!r}")
    if x.numel() == 0:
        return rms_norm_reference(x, weight, eps, mode)
    return RMSNormFunction.apply(x, weight, eps, mode)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: CastingMode = "llama") -> torch.Tensor:
    """Plain torch, op for op as ``LlamaRMSNorm`` (mode llama) and ``Gemma3RMSNorm`` (mode gemma)."""
    x32 = x.to(torch.float32)
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "gemma":
        return (x_hat * (1.0 + weight.float())).type_as(x)
    return weight * x_hat.to(x.dtype)
