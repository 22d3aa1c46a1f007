"""GeGLU's fused elementwise op ``gelu_tanh(a) · b``: Triton kernels (CUDA), memory-saving torch path (CPU), reference.

The gemma3 MLP is ``down(gelu_tanh(gate(x)) · up(x))`` (``hidden_activation="gelu_pytorch_tanh"``,
https://arxiv.org/abs/2002.05202); this op is the part between the projections, ``a = gate(x)``, ``b = up(x)``.
With ``k = sqrt(2/π)`` and ``t = tanh(k · (a + 0.044715 · a³))`` (https://arxiv.org/abs/1606.08415):

    gelu_tanh(a) = 0.5 · a · (1 + t)
    c            = gelu_tanh(a) · b           gelu in fp32, rounded to b's dtype, then the product
    dc/db        = gelu_tanh(a)
    dc/da        = 0.5 · (1 + t) + 0.5 · a · (1 − t²) · k · (1 + 3 · 0.044715 · a²)

Rounding follows the transformers module (``F.gelu(approximate="tanh")`` then ``*``): the torch path runs
the very aten ops its autograd runs and matches it bit for bit; the Triton kernels are within a few fp32
ulps before rounding. Both paths save only ``a`` and ``b`` and recompute ``t`` in the backward; the
reference also keeps ``gelu_tanh(a)`` alive until the backward.
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
    def _geglu_forward_kernel(C, A, B, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
        # tanh(z) = 2σ(2z) − 1: libdevice's tanh has no CPU-interpreter implementation, and this form
        # is within a few fp32 ulps of it (the error enters gelu as 0.5·a·δ, below bf16's resolution)
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (a + 0.044715 * a * a * a)) - 1.0  # k = sqrt(2/π)
        gelu = (0.5 * a * (1.0 + t)).to(B.dtype.element_ty).to(tl.float32)
        tl.store(C + offsets, (gelu * b).to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_backward_kernel(DA, DB, DC, A, B, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        dc = tl.load(DC + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (a + 0.044715 * a * a * a)) - 1.0  # recomputed, not saved
        gelu = (0.5 * a * (1.0 + t)).to(B.dtype.element_ty).to(tl.float32)
        dgelu = (dc * b).to(A.dtype.element_ty).to(tl.float32)  # rounded where autograd rounds it
        slope = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        tl.store(DA + offsets, (dgelu * slope).to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + offsets, (dc * gelu).to(DB.dtype.element_ty), mask=mask)


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, _BLOCK_SIZE),)


def _triton_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    c = torch.empty_like(b)
    _geglu_forward_kernel[_grid(a.numel())](c, a, b, a.numel(), BLOCK_SIZE=_BLOCK_SIZE)
    return c


def _triton_backward(dc, a, b, need_da: bool, need_db: bool):
    da, db = torch.empty_like(a), torch.empty_like(b)
    _geglu_backward_kernel[_grid(a.numel())](da, db, dc.contiguous(), a, b, a.numel(), BLOCK_SIZE=_BLOCK_SIZE)
    return (da if need_da else None), (db if need_db else None)


def _torch_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh").mul_(b)  # gelu(a) is the output buffer, not a saved intermediate


def _torch_backward(dc, a, b, need_da: bool, need_db: bool):
    """transformers' arithmetic (mul backward, then gelu_backward), with no temporary beyond the grads."""
    da = db = None
    if need_da:
        da = dc * b
        torch.ops.aten.gelu_backward.grad_input(da, a, approximate="tanh", grad_input=da)  # in place, our buffer
    if need_db:
        db = F.gelu(a, approximate="tanh").mul_(dc)
    return da, db


class GeluTanhMulFunction(torch.autograd.Function):
    """``gelu_tanh(a) · b``; Triton or torch per call (see ``tunegraph.kernels.dispatch``)."""

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


def gelu_tanh_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(a) · b`` for same-shape, same-dtype ``a``, ``b`` (anything else goes to the reference)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return gelu_tanh_mul_reference(a, b)
    return GeluTanhMulFunction.apply(a, b)


def gelu_tanh_mul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain torch, as the gemma3 MLP computes it: ``act_fn(gate) * up`` with ``gelu_pytorch_tanh``."""
    return F.gelu(a, approximate="tanh") * b
