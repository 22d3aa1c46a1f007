"""SwiGLU and GeGLU fused elementwise ops (Triton in the CPU interpreter, and the torch path) against the
activations transformers' MLPs use (``ACT2FN[hidden_act](gate) * up``)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from tunegraph.kernels import dispatch
from tunegraph.kernels.geglu import gelu_tanh_mul
from tunegraph.kernels.swiglu import silu_mul

# fused op -> the hidden_act whose transformers activation it replaces (llama/qwen2, gemma3)
OPS = {"swiglu": (silu_mul, "silu"), "geglu": (gelu_tanh_mul, "gelu_pytorch_tanh")}

# the Triton kernels work on blocks of 1024 flattened elements: (1, 2100) spans three, the last ragged
SHAPES = {"torch": [(2, 64, 1536), (3, 7, 41)], "triton": [(5, 37), (1, 2100)]}
CASES = [(backend, shape) for backend, shapes in SHAPES.items() for shape in shapes]


@pytest.fixture
def device(request, monkeypatch) -> str:
    """Forces the backend named by the test's `backend` param; returns the device its tensors live on."""
    backend = request.getfixturevalue("backend")
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    if backend == "torch":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if not (dispatch.triton_available() and dispatch.interpreting()):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    return "cpu"


def run_both(op: str, a: torch.Tensor, b: torch.Tensor, need_a_grad: bool = True):
    """(c, a grad, b grad) for the fused op and for transformers' activation-times-up, same upstream grad."""
    fused_op, hidden_act = OPS[op]
    results = []
    for fn in (fused_op, lambda a, b: ACT2FN[hidden_act](a) * b):
        a_in, b_in = a.clone().requires_grad_(need_a_grad), b.clone().requires_grad_()
        c = fn(a_in, b_in)
        c.backward(torch.ones_like(c).normal_(generator=torch.Generator(c.device).manual_seed(5)))
        results.append((c, a_in.grad, b_in.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "shape"), CASES)
def test_matches_transformers_activation(backend, shape, op, dtype, device):
    torch.manual_seed(0)
    a = 3 * torch.randn(shape, dtype=dtype, device=device)  # gate pre-activations well into both tails
    b = torch.randn(shape, dtype=dtype, device=device)
    fused, reference = run_both(op, a, b)
    for actual, expected in zip(fused, reference):
        assert actual.dtype == expected.dtype
        if backend == "torch":
            # the torch path runs the very aten ops transformers' autograd runs (silu / gelu, mul,
            # silu_backward / gelu_backward) on the same tensors: only where results live differs
            assert torch.equal(actual, expected)
        else:
            # fp32: the kernels' sigmoid (and tanh = 2σ(2z) − 1) differ from torch's by a few ulps
            # (eps = 1.2e-7) and da is one fused expression instead of two rounded ops: 1e-5 of the scale.
            # bf16 (unit roundoff 2^-8): the activation is rounded to bf16 before the product in both, so a
            # few-ulp fp32 difference can flip that rounding and then the product's: 2 ulps = 2^-6 relative.
            tol = 1e-5 if dtype == torch.float32 else 2**-6
            scale = expected.abs().max().item()
            torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gate_without_grad(backend, op, device):
    # a frozen gate projection fed by an input that needs no grad: only b gets a gradient
    torch.manual_seed(1)
    a, b = torch.randn(5, 37, device=device), torch.randn(5, 37, device=device)
    fused, reference = run_both(op, a, b, need_a_grad=False)
    assert fused[1] is None
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_are_left_untouched(backend, op, device):
    # the backward must not reuse a's or b's memory: callers (and autograd) may still hold them
    torch.manual_seed(2)
    a = torch.randn(4, 33, device=device, requires_grad=True)
    b = torch.randn(4, 33, device=device, requires_grad=True)
    a_before, b_before = a.detach().clone(), b.detach().clone()
    OPS[op][0](a, b).sum().backward()
    assert torch.equal(a.detach(), a_before) and torch.equal(b.detach(), b_before)
