"""Rotary position embedding (RoPE) on q and k: Triton kernel (CUDA), memory-saving torch path (CPU), reference.

Same contract as transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``, whose
``rotate_half`` pairs feature ``i`` with feature ``i + d/2`` (https://arxiv.org/abs/2104.09864).
Splitting the head dim into halves, ``x = [x1, x2]``, ``cos = [c1, c2]``, ``sin = [s1, s2]``:

    y1 = x1·c1 − x2·s1
    y2 = x2·c2 + x1·s2

transformers builds ``cos``/``sin`` from ``cat(freqs, freqs)``, so ``c1 = c2`` and ``s1 = s2``; nothing
here assumes it. The map is linear in ``x``; its transpose gives the backward:

    dx1 = dy1·c1 + dy2·s2
    dx2 = dy2·c2 − dy1·s1

which is the forward with ``(s1, s2)`` replaced by ``(−s2, −s1)``, so one kernel does both.
``cos``/``sin`` are constants (transformers computes them under ``no_grad``); when they require grad the
call falls back to the reference so their gradient is still right.

Shapes: ``q`` is (batch, heads, seq, head_dim) with ``unsqueeze_dim=1`` or (batch, seq, heads, head_dim)
with ``unsqueeze_dim=2``; ``cos``/``sin`` are (batch or 1, seq, head_dim). The kernel reads q and k
through their strides, so the usual ``.view(...).transpose(1, 2)`` layout is never copied. Nothing is
saved for the backward but ``cos`` and ``sin``.
"""

from __future__ import annotations

import torch

from tunegraph.kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform: only the torch path runs (see dispatch)
    triton = None


if triton is not None:

    @triton.jit
    def _rope_kernel(
        OUT, out_stride_b, out_stride_h, out_stride_s,
        X, x_stride_b, x_stride_h, x_stride_s,
        COS, SIN, cos_stride_b, cos_stride_s,
        seq_len, n_heads, half,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program per (batch, position): every head of that token, both halves of the head dim
        program = tl.program_id(0).to(tl.int64)
        b = program // seq_len
        s = program % seq_len
        dims = tl.arange(0, BLOCK_D)
        heads = tl.arange(0, BLOCK_H)
        dim_mask = dims < half
        mask = (heads[:, None] < n_heads) & dim_mask[None, :]

        trig = b * cos_stride_b + s * cos_stride_s
        c1 = tl.load(COS + trig + dims, mask=dim_mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + trig + half + dims, mask=dim_mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + trig + dims, mask=dim_mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + trig + half + dims, mask=dim_mask, other=0.0).to(tl.float32)
        if BACKWARD:
            s1, s2 = -s2, -s1

        x_first = X + b * x_stride_b + s * x_stride_s + heads[:, None] * x_stride_h + dims[None, :]
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_first + half, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]

        out_first = OUT + b * out_stride_b + s * out_stride_s + heads[:, None] * out_stride_h + dims[None, :]
        tl.store(out_first, y1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_first + half, y2.to(OUT.dtype.element_ty), mask=mask)


def _triton_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, backward: bool):
    heads_first = x if unsqueeze_dim == 1 else x.transpose(1, 2)  # (batch, heads, seq, head_dim)
    if heads_first.stride(-1) != 1:
        heads_first = heads_first.contiguous()
    out = torch.empty_like(heads_first, dtype=torch.promote_types(x.dtype, cos.dtype))
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, n_heads, seq_len, head_dim = heads_first.shape
    cos_stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)  # one table broadcast over the batch
    _rope_kernel[(batch * seq_len,)](
        out, out.stride(0), out.stride(1), out.stride(2),
        heads_first, heads_first.stride(0), heads_first.stride(1), heads_first.stride(2),
        cos, sin, cos_stride_b, cos.stride(1),
        seq_len, n_heads, head_dim // 2,
        BACKWARD=backward, BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(head_dim // 2),
    )
    return out if unsqueeze_dim == 1 else out.transpose(1, 2)


def _torch_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, backward: bool):
    """The two products per half written straight into the output (no rotate_half/cat copies of x)."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if backward:
        s1, s2 = -s2, -s1  # cos-sized temporaries, broadcast over the heads
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    x1, x2 = x[..., :half], x[..., half:]
    torch.mul(x1, c1, out=out[..., :half]).addcmul_(x2, s1, value=-1)
    torch.mul(x2, c2, out=out[..., half:]).addcmul_(x1, s2)
    return out


class RotaryFunction(torch.autograd.Function):
    """Rotates q and k by the same angles; Triton or torch per call (see ``tunegraph.kernels.dispatch``)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim: int):
        ctx.rotate = _triton_rotate if use_triton(q, k, cos, sin) else _torch_rotate
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.input_dtypes = q.dtype, k.dtype  # the outputs are promoted with cos's dtype; grads are not
        ctx.save_for_backward(cos, sin)
        return ctx.rotate(q, cos, sin, unsqueeze_dim, False), ctx.rotate(k, cos, sin, unsqueeze_dim, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.input_dtypes
        dq = ctx.rotate(dq, cos, sin, ctx.unsqueeze_dim, True).to(q_dtype) if ctx.needs_input_grad[0] else None
        dk = ctx.rotate(dk, cos, sin, ctx.unsqueeze_dim, True).to(k_dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None


def _fused_shapes_ok(q, k, cos, sin, unsqueeze_dim: int) -> bool:
    """The shapes the fused op handles; anything else goes to the reference (which broadcasts freely)."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, seq_dim = q.shape[0], 3 - unsqueeze_dim  # the seq axis of q: 2 for (b, h, s, d), 1 for (b, s, h, d)
    return (
        q.shape[-1] % 2 == 0
        and q.shape[-1] == k.shape[-1] == cos.shape[-1]
        and k.shape[0] == batch
        and q.shape[seq_dim] == k.shape[seq_dim] == cos.shape[1]
        and cos.shape[0] in (1, batch)
    )


def rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (same arguments, same results)."""
    if cos.requires_grad or sin.requires_grad or not _fused_shapes_ok(q, k, cos, sin, unsqueeze_dim):
        return rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim)
    return RotaryFunction.apply(q, k, cos, sin, unsqueeze_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, op for op as transformers' ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
