"""RMSNorm kernel (Triton in the CPU interpreter, and the torch path) against transformers' own modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunegraph.kernels import dispatch
from tunegraph.kernels import rms_norm as rms_norm_module
from tunegraph.kernels.rms_norm import rms_norm

EPS = 1e-6
HF_MODULES = {"llama": LlamaRMSNorm, "gemma": Gemma3RMSNorm}

# The Triton interpreter runs each program in numpy, so Triton gets small (odd) shapes and the torch
# path gets SmolLM2's hidden size as well.
SHAPES = {"torch": [(3, 70, 576), (3, 5, 37)], "triton": [(5, 37), (2, 3, 64)]}
CASES = [(backend, shape) for backend, shapes in SHAPES.items() for shape in shapes]


@pytest.fixture
def device(request, monkeypatch) -> str:
    """Forces the backend named by the test's `backend` param; returns the device its tensors live on."""
    backend = request.getfixturevalue("backend")
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    if backend == "torch":
        # chunks of 4096 elements: several per tensor, the last one ragged, so chunk edges are covered
        monkeypatch.setattr(rms_norm_module, "_CHUNK_ELEMENTS", 4096)
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if not (dispatch.triton_available() and dispatch.interpreting()):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    return "cpu"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None) -> None:
    """Tolerances relative to the tensor's largest element (cancellation in dx makes small elements noisy).

    fp32: the fused ops reorder sums and use rstd·(g − x̂·mean(g·x̂)) instead of autograd's chain, which
    moves results by a few ulps (eps = 1.2e-7) of the scale; 1e-5 leaves a wide margin.
    bf16: 8 significant bits (unit roundoff u = 2^-8). transformers rounds after every op, the kernels
    round fp32 results once, so an element can move by ~2 ulps = 4u = 2^-6 of its magnitude.
    """
    assert actual.dtype == expected.dtype
    tol = tol or (1e-5 if expected.dtype == torch.float32 else 2**-6)
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def hf_norm(mode: str, n: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A transformers RMSNorm with non-trivial weights (ones/zeros would hide the casting order)."""
    module = HF_MODULES[mode](n, eps=EPS).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.normal_(1.0 if mode == "llama" else 0.0, 0.5)
    return module


def run_both(module, x: torch.Tensor, mode: str, weight_grad: bool = True):
    """(fused y, x grad, w grad), (transformers y, x grad, w grad) for the same input and upstream grad."""
    weight = module.weight.detach().clone().requires_grad_(weight_grad)
    x_fused, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fused, y_hf = rms_norm(x_fused, weight, EPS, mode), module(x_hf)
    dy = torch.randn_like(y_hf)
    y_fused.backward(dy)
    y_hf.backward(dy)
    return (y_fused, x_fused.grad, weight.grad), (y_hf, x_hf.grad, module.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize(("backend", "shape"), CASES)
def test_matches_transformers_module(backend, shape, mode, dtype, device):
    torch.manual_seed(0)
    module = hf_norm(mode, shape[-1], dtype, device)
    x = 2 * torch.randn(shape, dtype=dtype, device=device)
    fused, reference = run_both(module, x, mode)
    for actual, expected in zip(fused, reference):
        assert_matches(actual, expected)


@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_transposed_input_keeps_its_layout(backend, mode, device):
    # gemma3's q_norm sees q as .view(b, s, h, d).transpose(1, 2): rows are dense but not in order
    torch.manual_seed(1)
    module = hf_norm(mode, 16, torch.float32, device)
    x = torch.randn(2, 5, 3, 16, device=device).transpose(1, 2)
    fused, reference = run_both(module, x, mode)
    assert fused[0].stride() == reference[0].stride()
    for actual, expected in zip(fused, reference):
        assert_matches(actual, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_weight_gets_no_grad(backend, device):
    # under LoRA the norm weights are frozen: the kernel skips dw and x's grad is unchanged
    torch.manual_seed(2)
    module = hf_norm("llama", 37, torch.float32, device)
    module.weight.requires_grad_(False)
    fused, reference = run_both(module, torch.randn(5, 37, device=device), "llama", weight_grad=False)
    assert fused[2] is None
    assert_matches(fused[0], reference[0])
    assert_matches(fused[1], reference[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama_mode_promotes_like_transformers(backend, device):
    # bf16 activations with an fp32 weight: transformers returns fp32 (w · x̂.to(bf16)); grads keep input dtypes
    torch.manual_seed(3)
    module = hf_norm("llama", 37, torch.float32, device)
    x = torch.randn(5, 37, dtype=torch.bfloat16, device=device)
    fused, reference = run_both(module, x, "llama")
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    for actual, expected in zip(fused, reference):
        assert_matches(actual, expected, tol=2**-6)  # x̂ is rounded to bf16 first, as in bf16 above


def test_cpu_tensors_take_the_torch_path_unless_triton_is_forced(monkeypatch):
    launched = []
    real_triton_forward = rms_norm_module._triton_forward
    monkeypatch.setattr(rms_norm_module, "_triton_forward", lambda *a: launched.append(1) or real_triton_forward(*a))
    x, weight = torch.randn(5, 37), torch.ones(37)

    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    rms_norm(x, weight, EPS)
    assert launched == []

    if dispatch.triton_available() and dispatch.interpreting():
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
        rms_norm(x, weight, EPS)
        assert launched == [1]


def test_unknown_casting_mode_is_refused():
    with pytest.raises(ValueError, match="casting mode"):
        rms_norm(torch.randn(2, 4), torch.ones(4), EPS, "t5")
