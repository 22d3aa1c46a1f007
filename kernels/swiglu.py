"""SwiGLU's fused elementwise op ``silu(a) · b``: Triton kernels (CUDA), memory-saving torch path (CPU), reference.

The llama/qwen2 MLP is ``down(silu(gate(x)) · up(x))`` (https://arxiv.org/abs/2002.05202); this op is
the part between the projections, with ``a = gate(x)`` and ``b = up(x)``:

    silu(a) = a · σ(a)
    c       = silu(a) · b                     silu in fp32, rounded to b's dtype, then the product
    dc/db   = silu(a)
    dc/da   = σ(a) · (1 + a · (1 − σ(a)))

Rounding follows the transformers module (``F.silu`` then ``*``): the torch path runs the very aten ops
its autograd runs and matches it bit for bit; the Triton kernels are within a few fp32 ulps before
rounding. Both paths save only ``a`` and ``b`` and recompute ``σ(a)`` in the backward; the reference
also keeps ``silu(a)`` alive until the backward, one more tensor of the MLP's widest size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunegraph.kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform: only the torch path runs (see dispatch)
    triton = None

_BLOCK_SIZE = 1024  # elements per program; the op is elementwise, so shapes are flattened


if triton is not None:

    @triton.jit
    def _swiglu_forward_kernel(C, A, B, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
        silu = (a * tl.sigmoid(a)).to(B.dtype.element_ty).to(tl.float32)
        tl.store(C + offsets, (silu * b).to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(DA, DB, DC, A, B, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        dc = tl.load(DC + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)  # recomputed rather than saved
        silu = (a * sig).to(B.dtype.element_ty).to(tl.float32)
        dsilu = (dc * b).to(A.dtype.element_ty).to(tl.float32)  # rounded where autograd rounds it
        tl.store(DA + offsets, (dsilu * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + offsets, (dc * silu).to(DB.dtype.element_ty), mask=mask)


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, _BLOCK_SIZE),)


def _triton_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    c = torch.empty_like(b)
    _swiglu_forward_kernel[_grid(a.numel())](c, a, b, a.numel(), BLOCK_SIZE=_BLOCK_SIZE)
    return c


def _triton_backward(dc, a, b, need_da: bool, need_db: bool):
    da, db = torch.empty_like(a), torch.empty_like(b)
    _swiglu_backward_kernel[_grid(a.numel())](da, db, dc.contiguous(), a, b, a.numel(), BLOCK_SIZE=_BLOCK_SIZE)
    return (da if need_da else None), (db if need_db else None)


def _torch_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a).mul_(b)  # silu(a) is the output buffer, not a saved intermediate


def _torch_backward(dc, a, b, need_da: bool, need_db: bool):
    """transformers' arithmetic (mul backward, then silu_backward), with no temporary beyond the grads."""
    da = db = None
    if need_da:
        da = dc * b
        torch.ops.aten.silu_backward.grad_input(da, a, grad_input=da)  # in place on our own buffer
    if need_db:
        db = F.silu(a).mul_(dc)
    return da, db


class SiluMulFunction(torch.autograd.Function):
    """``silu(a) · b``; Triton or torch per call (see ``tunegraph.kernels.dispatch``)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        ctx.triton = use_triton(a, b)
        ctx.save_for_backward(a, b)
        return _triton_forward(a, b) if ctx.triton else _torch_forward(a, b)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a, b = ctx.saved_tensors
        backward = _triton_backward if ctx.triton else _torch_backward
        return backward(dc, a, b, *ctx.needs_input_grad)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) · b`` for same-shape, same-dtype ``a``, ``b`` (anything else goes to the reference)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return silu_mul_reference(a, b)
    return SiluMulFunction.apply(a, b)


def silu_mul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain torch, as the transformers MLP computes it: ``act_fn(gate) * up``."""
    return F.silu(a) * b
