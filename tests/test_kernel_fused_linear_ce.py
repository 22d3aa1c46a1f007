"""Fused linear cross-entropy: loss and gradients against F.cross_entropy on full logits, both backends.

Tolerances. fp32: the fused op sums the same terms in another order (online log-sum-exp per block,
grad_W accumulated chunk by chunk), so results differ from the reference by a few float32 roundings:
rtol 1e-4 with an absolute floor of 1e-5 of the tensor's largest entry. bf16: both sides compute the
logits with the same bf16 matmul; the gradients are then rounded to bf16 once (relative 2**-8 = 0.4 %)
at different points (the reference rounds d loss/d logits before its matmuls, the fused op rounds
grad_W after an fp32 accumulation), so entries may differ by about one bf16 step: rtol 2e-2, with an
absolute floor of 2e-2 of the largest entry for entries near zero.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from tunegraph.errors import TunegraphError
from tunegraph.kernels import fused_linear_cross_entropy as flce
from tunegraph.kernels.fused_linear_cross_entropy import (default_chunk_rows, fused_linear_cross_entropy,
                                                          linear_cross_entropy_reference, linear_token_logps)

FP32_RTOL, FP32_FLOOR = 1e-4, 1e-5
BF16_RTOL, BF16_FLOOR = 2e-2, 2e-2


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, floor: float) -> None:
    actual, expected = actual.detach().float(), expected.detach().float()
    atol = floor * float(expected.abs().max().clamp(min=1e-30))
    assert_close(actual, expected, rtol=rtol, atol=atol)


def make_head(rows, hidden_size, vocab, dtype=torch.float32, bias=False, seed=0, ignored=(2,)):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, rows, generator=generator)
    labels.view(-1)[list(ignored)] = -100
    return hidden, weight, b, labels


def grads_of(loss_fn, tensors, upstream=None):
    for t in tensors:
        if t is not None:
            t.grad = None
    loss = loss_fn()
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in tensors]


def compare_with_reference(hidden, weight, bias, labels, rtol, floor, upstream=None, chunk_rows=None, **options):
    tensors = (hidden, weight, bias)
    fused_loss, fused_grads = grads_of(
        lambda: fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_rows=chunk_rows, **options),
        tensors, upstream)
    ref_loss, ref_grads = grads_of(
        lambda: linear_cross_entropy_reference(hidden, weight, labels, bias, **options), tensors, upstream)
    close(fused_loss, ref_loss, rtol, floor)
    for fused_grad, ref_grad in zip(fused_grads, ref_grads):
        if ref_grad is None:
            assert fused_grad is None
        else:
            close(fused_grad, ref_grad, rtol, floor)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_KERNEL_BACKEND", request.param)
    return request.param


OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"softcap": 3.0},
    {"reduction": "sum", "label_smoothing": 0.2, "softcap": 2.0},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "smoothing", "softcap", "sum-smoothing-softcap"])
def test_small_odd_shape_matches_reference(backend, options):
    hidden, weight, bias, labels = make_head((7,), 33, 301, bias=True, ignored=(2, 5))
    upstream = torch.tensor(1.5)  # backward must scale the gradients stored by forward
    compare_with_reference(hidden, weight, bias, labels, FP32_RTOL, FP32_FLOOR, upstream, chunk_rows=3, **options)


def test_reduction_none_recomputes_with_per_row_upstream_gradients(backend):
    hidden, weight, _, labels = make_head((7,), 33, 301)
    upstream = torch.linspace(-1.0, 2.0, 7)  # distinct per row: grad_W must weight each row before summing
    compare_with_reference(hidden, weight, None, labels, FP32_RTOL, FP32_FLOOR, upstream=upstream,
                           chunk_rows=2, reduction="none", softcap=5.0)


def test_bf16_matches_bf16_reference(backend):
    hidden, weight, bias, labels = make_head((7,), 33, 301, dtype=torch.bfloat16, bias=True)
    compare_with_reference(hidden, weight, bias, labels, BF16_RTOL, BF16_FLOOR, chunk_rows=4, label_smoothing=0.1)
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.bfloat16


def test_triton_backend_launches_the_kernel(monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_KERNEL_BACKEND", "triton")
    launches = []
    launcher = flce._cross_entropy_chunk_triton
    monkeypatch.setattr(flce, "_cross_entropy_chunk_triton", lambda *a: launches.append(1) or launcher(*a))
    hidden, weight, _, labels = make_head((7,), 33, 301)
    fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=3)
    assert len(launches) == 3  # one launch per chunk of 3, 3, 1 rows
    monkeypatch.setenv("TUNEGRAPH_KERNEL_BACKEND", "auto")  # CPU tensors: the torch path
    fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=3)
    assert len(launches) == 3


@pytest.mark.parametrize("chunk_rows", [None, 37])
def test_moderate_batch_sequence_shape_on_cpu_path(chunk_rows):
    hidden, weight, bias, labels = make_head((3, 170), 96, 5003, bias=True, ignored=range(0, 510, 7))
    compare_with_reference(hidden, weight, bias, labels, FP32_RTOL, FP32_FLOOR, chunk_rows=chunk_rows,
                           label_smoothing=0.05, softcap=30.0)


def test_moderate_bf16_on_cpu_path():
    hidden, weight, _, labels = make_head((300,), 64, 4099, dtype=torch.bfloat16)
    compare_with_reference(hidden, weight, None, labels, BF16_RTOL, BF16_FLOOR, chunk_rows=64)


def test_per_row_losses_do_not_depend_on_chunking():
    hidden, weight, _, labels = make_head((50,), 16, 999)
    with torch.no_grad():
        losses = [fused_linear_cross_entropy(hidden, weight, labels, reduction="none", chunk_rows=rows)
                  for rows in (1, 7, 50)]
    # not bitwise: the matmul kernel may block a 1-row and a 50-row product differently
    close(losses[0], losses[1], 1e-6, 1e-7)
    close(losses[0], losses[2], 1e-6, 1e-7)


def test_frozen_head_gets_no_gradient():
    hidden, weight, _, labels = make_head((7,), 33, 301)
    weight.requires_grad_(False)
    compare_with_reference(hidden, weight, None, labels, FP32_RTOL, FP32_FLOOR)
    assert weight.grad is None


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    hidden, weight, _, labels = make_head((5,), 8, 50, ignored=range(5))
    loss, (grad_h, grad_w) = grads_of(lambda: fused_linear_cross_entropy(hidden, weight, labels), (hidden, weight))
    assert loss.item() == 0.0  # torch's F.cross_entropy gives nan here; a masked micro-batch must not
    assert not grad_h.any() and not grad_w.any()


def test_token_logps_are_log_softmax_at_the_label(backend):
    hidden, weight, _, labels = make_head((2, 4), 12, 97, ignored=(3,))
    logps = linear_token_logps(hidden, weight, labels, softcap=4.0)
    logits = 4.0 * torch.tanh(hidden @ weight.t() / 4.0)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    close(logps, expected.masked_fill(labels == -100, 0.0), FP32_RTOL, FP32_FLOOR)
    assert logps.shape == labels.shape


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (a deterministic stand-in for peak memory)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_full_logits_are_never_materialized():
    rows, chunk, vocab = 64, 8, 1000
    hidden, weight, _, labels = make_head((rows,), 4, vocab)  # H=4: grad_W (V x H) is below a chunk
    with LargestTensor() as fused_probe:
        fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk).backward()
    with LargestTensor() as reference_probe:
        linear_cross_entropy_reference(hidden, weight, labels).backward()
    assert reference_probe.numel == rows * vocab
    assert fused_probe.numel == chunk * vocab  # one chunk of logits


def test_default_chunk_follows_liger_rule_with_a_floor():
    # Gemma 3 head, 4096 rows: Liger's rule gives ceil(4096 / ceil(262144 / 640)) = 10 rows; the floor wins
    assert default_chunk_rows(4096, 640, 262_144) == flce.MIN_CHUNK_ROWS
    # a large hidden size makes Liger's rule the larger one
    assert default_chunk_rows(65_536, 8192, 32_000) == 65_536 // 4
    assert default_chunk_rows(3, 64, 1000) == 3


def test_no_grad_call_builds_no_graph():
    hidden, weight, _, labels = make_head((7,), 33, 301)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    close(loss, linear_cross_entropy_reference(hidden, weight, labels).detach(), FP32_RTOL, FP32_FLOOR)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "avg"}, "reduction='avg'"),
        ({"label_smoothing": 1.5}, "label_smoothing=1.5"),
        ({"softcap": 0.0}, "softcap=0.0"),
        ({"chunk_rows": 0}, "chunk_rows=0"),
    ],
)
def test_bad_options_are_user_errors(kwargs, message):
    hidden, weight, _, labels = make_head((4,), 8, 20)
    with pytest.raises(TunegraphError, match=message):
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_shapes_and_labels_are_user_errors():
    hidden, weight, _, labels = make_head((4,), 8, 20)
    with pytest.raises(TunegraphError, match="do not match"):
        fused_linear_cross_entropy(hidden, weight[:, :7], labels)
    with pytest.raises(TunegraphError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(TunegraphError, match="label 20 outside"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 20, 1, 2]))
