"""RoPE kernel (Triton in the CPU interpreter, and the torch path) against transformers' apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tunegraph.kernels import dispatch
from tunegraph.kernels.rope import rotary_pos_emb

# (batch, seq, heads, kv_heads, head_dim): SmolLM2's 9 x 64 heads with 3 kv heads for the torch path;
# odd sizes (half head dim 3, 5 heads -> padded blocks) for the slow Triton interpreter
SHAPES = {"torch": [(2, 48, 9, 3, 64), (3, 5, 5, 1, 6)], "triton": [(2, 5, 5, 1, 6), (1, 3, 4, 2, 16)]}
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


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Tolerances relative to the tensor's largest element.

    fp32: y1 = x1·c1 − x2·s1 differs from transformers' (x·cos) + (rotate_half(x)·sin) only in rounding
    order (the torch path uses a fused multiply-add): an ulp or two (eps = 1.2e-7); 1e-5 is a wide margin.
    bf16: transformers rounds each product and the sum (three roundings), the kernel rounds once; when
    the two products nearly cancel, the difference is an ulp of the products, not of the result, so the
    bound is 2 ulps (2^-7 relative, unit roundoff 2^-8) of the tensor's scale.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = 1e-5 if expected.dtype == torch.float32 else 2**-6
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def rope_tables(batch: int, seq: int, head_dim: int, dtype, device, per_row_positions: bool):
    """cos/sin as transformers builds them; per-row positions (as with left padding) give a batch dim."""
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config).to(device)
    positions = torch.arange(seq, device=device)[None]
    if per_row_positions:
        positions = positions + 7 * torch.arange(batch, device=device)[:, None]
    return rotary(torch.empty(0, dtype=dtype, device=device), positions)


def heads_first(batch, seq, heads, head_dim, dtype, device):
    """q as the attention module makes it: .view(b, s, h, d).transpose(1, 2), not contiguous."""
    return torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)


def run_both(q, k, cos, sin, unsqueeze_dim=1):
    """Outputs and grads of (q, k, cos, sin) for the fused op and for transformers, same upstream grads."""
    results = []
    for rope in (rotary_pos_emb, apply_rotary_pos_emb):
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (q, k, cos, sin)]
        q_out, k_out = rope(*inputs, unsqueeze_dim=unsqueeze_dim)
        torch.manual_seed(99)
        (q_out * torch.randn_like(q_out)).sum().add((k_out * torch.randn_like(k_out)).sum()).backward()
        results.append((q_out, k_out, *[t.grad for t in inputs]))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row_positions", [False, True])
@pytest.mark.parametrize(("backend", "shape"), CASES)
def test_matches_transformers(backend, shape, per_row_positions, dtype, device):
    torch.manual_seed(0)
    batch, seq, heads, kv_heads, head_dim = shape
    cos, sin = rope_tables(batch, seq, head_dim, dtype, device, per_row_positions)
    q = heads_first(batch, seq, heads, head_dim, dtype, device).requires_grad_()
    k = heads_first(batch, seq, kv_heads, head_dim, dtype, device).requires_grad_()
    fused, reference = run_both(q, k, cos, sin)
    assert fused[0].stride() == reference[0].stride()  # same memory layout as transformers' output
    for actual, expected in zip(fused[:4], reference[:4]):
        assert_matches(actual, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seq_major_layout_with_unsqueeze_dim_2(backend, device):
    # (batch, seq, heads, head_dim) inputs, as some attention implementations keep them
    torch.manual_seed(1)
    cos, sin = rope_tables(2, 5, 6, torch.float32, device, per_row_positions=True)
    q = torch.randn(2, 5, 3, 6, device=device, requires_grad=True)
    k = torch.randn(2, 5, 1, 6, device=device, requires_grad=True)
    fused, reference = run_both(q, k, cos, sin, unsqueeze_dim=2)
    for actual, expected in zip(fused[:4], reference[:4]):
        assert_matches(actual, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_does_not_assume_equal_halves_of_cos_and_sin(backend, device):
    # transformers' tables repeat the frequencies in both halves; the contract allows any cos/sin
    torch.manual_seed(2)
    cos, sin = torch.randn(2, 3, 6, device=device), torch.randn(2, 3, 6, device=device)
    q = heads_first(2, 3, 2, 6, torch.float32, device).requires_grad_()
    k = heads_first(2, 3, 1, 6, torch.float32, device).requires_grad_()
    fused, reference = run_both(q, k, cos, sin)
    for actual, expected in zip(fused[:4], reference[:4]):
        assert_matches(actual, expected)


@pytest.mark.parametrize("backend", ["torch"])
def test_cos_and_sin_that_require_grad_get_their_grads(backend, device):
    torch.manual_seed(3)
    cos = torch.randn(1, 4, 8, requires_grad=True)
    sin = torch.randn(1, 4, 8, requires_grad=True)
    q = heads_first(2, 4, 2, 8, torch.float32, device).requires_grad_()
    k = heads_first(2, 4, 2, 8, torch.float32, device).requires_grad_()
    fused, reference = run_both(q, k, cos, sin)
    for actual, expected in zip(fused, reference):
        assert_matches(actual, expected)
