"""Fused linear KL / generalized JSD for distillation: student and teacher heads without full logits.

Per row ``i`` (a token), student logits ``x_i = W_s h_i`` and teacher logits ``u_i = W_t g_i`` are
divided by the temperature ``tau``; ``Q = softmax(x_i / tau)`` is the student and ``P =
softmax(u_i / tau)`` the teacher distribution. With ``beta`` in ``[0, 1]``, the per-row loss is the
generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, https://arxiv.org/abs/2306.13649),
with the mixture ``M = beta * P + (1 - beta) * Q``::

    beta == 0:      KL(P || Q) = sum_j P_j (log P_j - log Q_j)              forward KL
    beta == 1:      KL(Q || P) = sum_j Q_j (log Q_j - log P_j)              reverse KL
    0 < beta < 1:   JSD_beta   = beta * KL(P || M) + (1 - beta) * KL(Q || M)

The two ends are defined as the KLs, as in GKD and TRL's ``generalized_jsd_loss`` (the JSD formula
itself goes to 0 there). The loss is the mean over rows whose label is not ``ignore_index`` (every row
when no labels are given; 0 when all rows are ignored); as in TRL and Liger-Kernel it is not
multiplied by ``tau**2``. Only the student gets gradients; the teacher is frozen. With ``a = log Q``,
``d_j = d loss / d a_j`` and ``s = x / tau``, the softmax chain rule gives
``d loss / d s_j = d_j - Q_j * sum_k d_k``, where::

    forward KL:  d_j = -P_j                               (so d loss / d s = Q - P)
    reverse KL:  d_j = Q_j (a_j - log P_j + 1)            (so d loss / d s_j = Q_j (a_j - log P_j - KL))
    JSD_beta:    d_j = (1 - beta) Q_j (a_j - log M_j)

Rows go through in chunks as in ``fused_linear_cross_entropy`` (Liger's ``LigerFusedLinearJSD`` is the
model): per chunk the student and teacher logits are computed in fp32, a Triton kernel (three passes over
the vocabulary: log-sum-exps, loss and ``sum_k d_k``, gradient) or torch ops overwrite the student
logits with ``d loss / d x``, and the gradient is projected onto ``h`` and ``W_s`` at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from tunegraph.errors import TunegraphError
from tunegraph.kernels.dispatch import triton_available, use_triton
from tunegraph.kernels.fused_linear_cross_entropy import (LinearGrads, check_chunk_rows, logits_into,
                                                          scale_by_upstream, triton_block_size)

FORWARD_KL, REVERSE_KL, GENERALIZED_JSD = 0, 1, 2


@dataclass(frozen=True)
class DivergenceOptions:
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise TunegraphError(f"distillation beta={self.beta}: must lie in [0, 1] (0 forward KL, 1 reverse KL)")
        if not self.temperature > 0:
            raise TunegraphError(f"distillation temperature={self.temperature}: must be > 0")

    @property
    def mode(self) -> int:
        return FORWARD_KL if self.beta == 0.0 else REVERSE_KL if self.beta == 1.0 else GENERALIZED_JSD


# --- Triton kernel: one program per row, three passes over the vocabulary ---------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _log_mixture(log_p, log_q, beta):
        # log(beta * P + (1 - beta) * Q) as a log-add-exp, exact when either probability underflows
        a = log_p + tl.log(beta)
        b = log_q + tl.log(1.0 - beta)
        high = tl.maximum(a, b)
        return high + tl.log(1.0 + tl.exp(tl.minimum(a, b) - high))

    @triton.jit
    def _divergence_rows_kernel(
        student_ptr, teacher_ptr, row_stride, row_scale_ptr, loss_ptr,
        n_cols, inv_temperature, beta,
        MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        student_ptr += row * row_stride
        teacher_ptr += row * row_stride
        scale = tl.load(row_scale_ptr + row)
        if scale == 0.0:  # ignored row: no loss, no gradient
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + tl.arange(0, BLOCK_SIZE)
                tl.store(student_ptr + cols, 0.0, mask=cols < n_cols)
            tl.store(loss_ptr + row, 0.0)
            return

        # pass 1: online log-sum-exp of student and teacher logits over tau
        max_s = float("-inf")
        sum_s = 0.0
        max_t = float("-inf")
        sum_t = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            s = tl.load(student_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            t = tl.load(teacher_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            new_max_s = tl.maximum(max_s, tl.max(s, 0))
            sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(tl.exp(s - new_max_s), 0)
            max_s = new_max_s
            new_max_t = tl.maximum(max_t, tl.max(t, 0))
            sum_t = sum_t * tl.exp(max_t - new_max_t) + tl.sum(tl.exp(t - new_max_t), 0)
            max_t = new_max_t
        lse_s = max_s + tl.log(sum_s)
        lse_t = max_t + tl.log(sum_t)

        # pass 2: the loss, and sum_k d_k (needed by every gradient element)
        loss = 0.0
        sum_d = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            log_q = tl.load(student_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_s
            log_p = tl.load(teacher_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
            if MODE == 0:
                term = tl.exp(log_p) * (log_p - log_q)
            elif MODE == 1:
                term = tl.exp(log_q) * (log_q - log_p)
            else:
                log_m = _log_mixture(log_p, log_q, beta)
                student_term = tl.exp(log_q) * (log_q - log_m)
                term = beta * tl.exp(log_p) * (log_p - log_m) + (1.0 - beta) * student_term
                sum_d += (1.0 - beta) * tl.sum(tl.where(mask, student_term, 0.0), 0)
            loss += tl.sum(tl.where(mask, term, 0.0), 0)
        tl.store(loss_ptr + row, loss)

        # pass 3: overwrite the student logits with scale * d loss / d x = scale / tau * (d_j - Q_j sum_d)
        grad_scale = scale * inv_temperature
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            log_q = tl.load(student_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_s
            log_p = tl.load(teacher_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
            q = tl.exp(log_q)
            if MODE == 0:
                grad = q - tl.exp(log_p)
            elif MODE == 1:
                grad = q * (log_q - log_p - loss)
            else:
                log_m = _log_mixture(log_p, log_q, beta)
                grad = (1.0 - beta) * q * (log_q - log_m) - q * sum_d
            tl.store(student_ptr + cols, (grad * grad_scale).to(student_ptr.dtype.element_ty), mask=mask)


def _divergence_chunk_triton(student: torch.Tensor, teacher: torch.Tensor, row_scale: torch.Tensor,
                             options: DivergenceOptions) -> torch.Tensor:
    """Per-row losses of contiguous fp32 logits chunks; ``student`` becomes ``row_scale * dloss/dx``."""
    n_rows, n_cols = student.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    block = triton_block_size(n_cols)
    _divergence_rows_kernel[(n_rows,)](
        student, teacher, student.stride(0), row_scale, losses,
        n_cols, 1.0 / options.temperature, float(options.beta),
        MODE=options.mode, BLOCK_SIZE=block, num_warps=32 if block >= 8192 else 8,
    )
    return losses


def _divergence_chunk_torch(student: torch.Tensor, teacher: torch.Tensor, row_scale: torch.Tensor,
                            options: DivergenceOptions) -> torch.Tensor:
    """Same contract as the Triton launcher, as whole-chunk torch ops (``teacher`` is overwritten too)."""
    beta, kept = options.beta, row_scale != 0
    log_q = torch.log_softmax(student.div_(options.temperature), dim=1)
    log_p = torch.log_softmax(teacher.div_(options.temperature), dim=1)
    q = log_q.exp()
    if options.mode == FORWARD_KL:
        p = log_p.exp()
        losses = (p * (log_p - log_q)).sum(1)
        grad = q.sub_(p)
    elif options.mode == REVERSE_KL:
        losses = (q * (log_q - log_p)).sum(1)
        grad = q.mul_(log_q.sub_(log_p).sub_(losses.unsqueeze(1)))
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        student_terms = q * (log_q - log_m)
        teacher_terms = log_p.exp() * (log_p - log_m)
        student_kl = student_terms.sum(1, keepdim=True)
        losses = beta * teacher_terms.sum(1) + (1.0 - beta) * student_kl.squeeze(1)
        grad = student_terms.sub_(q.mul_(student_kl)).mul_(1.0 - beta)
    student.copy_(grad.mul_((row_scale / options.temperature).unsqueeze(1)))
    return torch.where(kept, losses, 0.0)


def _chunked_divergence(
    student_hidden, student_weight, teacher_hidden, teacher_weight, row_scale,
    options: DivergenceOptions, chunk_rows: int, grads: LinearGrads,
) -> torch.Tensor:
    """Unscaled per-row losses; ``grads`` receive the gradient of ``sum_i row_scale_i * loss_i``."""
    n_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    tensors = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    chunk_loss = _divergence_chunk_triton if use_triton(*tensors) else _divergence_chunk_torch
    losses = torch.empty(n_rows, dtype=torch.float32, device=student_hidden.device)
    buffer_rows = min(chunk_rows, n_rows)
    student_buffer = torch.empty(buffer_rows, vocab, dtype=torch.float32, device=student_hidden.device)
    teacher_buffer = torch.empty_like(student_buffer)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        student = logits_into(student_buffer, student_hidden[rows], student_weight, None)
        teacher = logits_into(teacher_buffer, teacher_hidden[rows], teacher_weight, None)
        losses[rows] = chunk_loss(student, teacher, row_scale[rows], options)
        if grads.any:
            grads.add_chunk(rows, student, student_hidden[rows], student_weight)
    return losses


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Forward computes the mean loss and the student's gradients; backward scales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, kept,
                options: DivergenceOptions, chunk_rows: int, compute_grads: bool):
        row_scale = kept / kept.sum().clamp(min=1.0)
        needs = (*ctx.needs_input_grad[:2], False) if compute_grads else (False, False, False)
        grads = LinearGrads.zeros(student_hidden, student_weight, None, needs)
        losses = _chunked_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                     row_scale, options, chunk_rows, grads)
        grads = grads.finished(student_weight, None)
        ctx.save_for_backward(grads.hidden, grads.weight)
        return (losses * row_scale).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        scaled = [None if g is None else scale_by_upstream(g, grad_output) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None, None)


def fused_linear_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean generalized JSD (or KL, see the module docstring) between student and teacher heads.

    ``student_hidden`` is ``[..., Hs]`` with ``student_weight`` ``[V, Hs]``; ``teacher_hidden`` is
    ``[..., Ht]`` with ``teacher_weight`` ``[V, Ht]``; ``labels`` (optional, the leading shape) mark the
    rows to skip with ``ignore_index``. Gradients flow to the student hidden states and head only.
    """
    options = DivergenceOptions(float(beta), float(temperature), ignore_index)
    options.validate()
    _check_heads(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n_rows = student_flat.shape[0]
    if labels is None:
        kept = torch.ones(n_rows, dtype=torch.float32, device=student_flat.device)
    else:
        kept = (labels.reshape(-1) != ignore_index).float()
    rows = check_chunk_rows(chunk_rows, n_rows, student_weight.shape[1], student_weight.shape[0])
    compute_grads = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    return FusedLinearDivergenceFunction.apply(
        student_flat, student_weight, teacher_flat, teacher_weight.detach(), kept, options, rows, compute_grads
    )


def _check_heads(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) -> None:
    heads = (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight))
    for role, hidden, weight in heads:
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.dtype != weight.dtype:
            raise TunegraphError(
                f"fused linear JSD: {role} hidden {tuple(hidden.shape)} {hidden.dtype} and head "
                f"{tuple(weight.shape)} {weight.dtype} do not match; expected [..., H] and [V, H] of one dtype"
            )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise TunegraphError(
            f"fused linear JSD: student vocabulary {student_weight.shape[0]} != teacher vocabulary "
            f"{teacher_weight.shape[0]}; distillation over logits needs one shared tokenizer"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise TunegraphError(
            f"fused linear JSD: student rows {tuple(student_hidden.shape[:-1])} "
            f"!= teacher rows {tuple(teacher_hidden.shape[:-1])}"
        )
    if labels is not None and labels.shape != student_hidden.shape[:-1]:
        raise TunegraphError(
            f"fused linear JSD: labels {tuple(labels.shape)} must have shape {tuple(student_hidden.shape[:-1])}"
        )


def linear_jsd_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain torch, full fp32 logits, written like TRL's ``generalized_jsd_loss``; what the fused op reproduces."""
    student_logits = (student_hidden @ student_weight.t()).float() / temperature
    teacher_logits = ((teacher_hidden @ teacher_weight.t()).float() / temperature).detach()
    log_q = torch.log_softmax(student_logits.reshape(-1, student_logits.shape[-1]), dim=-1)
    log_p = torch.log_softmax(teacher_logits.reshape(-1, teacher_logits.shape[-1]), dim=-1)
    kl = torch.nn.functional.kl_div  # kl_div(input, target) = KL(target || input), both log-probs here
    if beta == 0.0:
        per_row = kl(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per_row = kl(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
        per_row = (beta * kl(log_m, log_p, reduction="none", log_target=True)
                   + (1 - beta) * kl(log_m, log_q, reduction="none", log_target=True)).sum(-1)
    if labels is None:
        return per_row.mean()
    kept = labels.reshape(-1) != ignore_index
    return per_row[kept].sum() / kept.sum().clamp(min=1)
