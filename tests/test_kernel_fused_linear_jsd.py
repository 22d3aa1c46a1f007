"""Fused linear KL / JSD: loss and student gradients against a TRL-style full-logits reference.

Tolerances as in test_kernel_fused_linear_ce.py: fp32 differs from the reference only by summation
order (rtol 1e-4, absolute floor 1e-5 of the largest entry); bf16 gradients are rounded to bf16 once,
at different points on each side (rtol 2e-2, absolute floor 2e-2 of the largest entry).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tunegraph.errors import TunegraphError
from tunegraph.kernels import fused_linear_jsd as fljsd
from tunegraph.kernels.fused_linear_jsd import fused_linear_jsd, linear_jsd_reference

FP32_RTOL, FP32_FLOOR = 1e-4, 1e-5
BF16_RTOL, BF16_FLOOR = 2e-2, 2e-2


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, floor: float) -> None:
    actual, expected = actual.detach().float(), expected.detach().float()
    atol = floor * float(expected.abs().max().clamp(min=1e-30))
    assert_close(actual, expected, rtol=rtol, atol=atol)


def make_pair(rows, student_size, teacher_size, vocab, dtype=torch.float32, seed=0, ignored=(2,)):
    """Student and teacher heads whose logits have a spread of a few nats, as trained models do."""
    generator = torch.Generator().manual_seed(seed)

    def head(size):
        hidden = torch.randn(*rows, size, generator=generator).to(dtype)
        weight = (torch.randn(vocab, size, generator=generator) * 2 / size**0.5).to(dtype)
        return hidden, weight

    student_hidden, student_weight = head(student_size)
    teacher_hidden, teacher_weight = head(teacher_size)
    labels = torch.randint(0, vocab, rows, generator=generator)
    labels.view(-1)[list(ignored)] = -100
    return student_hidden.requires_grad_(), student_weight.requires_grad_(), teacher_hidden, teacher_weight, labels


def student_grads(loss_fn, student_hidden, student_weight, upstream=1.0):
    student_hidden.grad, student_weight.grad = None, None
    loss = loss_fn()
    (loss * upstream).backward()
    return loss.detach(), student_hidden.grad, student_weight.grad


def compare_with_reference(pair, rtol, floor, upstream=1.0, chunk_rows=None, **options):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = pair
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    fused = student_grads(lambda: fused_linear_jsd(*args, chunk_rows=chunk_rows, **options),
                          student_hidden, student_weight, upstream)
    reference = student_grads(lambda: linear_jsd_reference(*args, **options), student_hidden, student_weight, upstream)
    for got, expected in zip(fused, reference):
        close(got, expected, rtol, floor)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_KERNEL_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.3, 2.0), (0.5, 1.0), (1.0, 0.7)])
def test_small_odd_shape_matches_reference(backend, beta, temperature):
    pair = make_pair((7,), 33, 45, 301, ignored=(2, 6))
    compare_with_reference(pair, FP32_RTOL, FP32_FLOOR, upstream=1.5, chunk_rows=3, beta=beta, temperature=temperature)


def test_bf16_matches_bf16_reference(backend):
    pair = make_pair((7,), 33, 45, 301, dtype=torch.bfloat16)
    compare_with_reference(pair, BF16_RTOL, BF16_FLOOR, chunk_rows=4, beta=0.5)
    assert pair[0].grad.dtype == pair[1].grad.dtype == torch.bfloat16


def test_triton_backend_launches_the_kernel(monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_KERNEL_BACKEND", "triton")
    launches = []
    launcher = fljsd._divergence_chunk_triton
    monkeypatch.setattr(fljsd, "_divergence_chunk_triton", lambda *a: launches.append(1) or launcher(*a))
    fused_linear_jsd(*make_pair((7,), 33, 45, 301), chunk_rows=4)
    assert len(launches) == 2


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_moderate_batch_sequence_shape_on_cpu_path(beta):
    pair = make_pair((2, 150), 64, 96, 4099, ignored=range(0, 300, 11))
    compare_with_reference(pair, FP32_RTOL, FP32_FLOOR, chunk_rows=41, beta=beta, temperature=2.0)


def test_moderate_bf16_on_cpu_path():
    pair = make_pair((200,), 64, 32, 2053, dtype=torch.bfloat16)
    compare_with_reference(pair, BF16_RTOL, BF16_FLOOR, beta=0.1)


def test_without_labels_every_row_counts():
    student_hidden, student_weight, teacher_hidden, teacher_weight, _ = make_pair((5,), 8, 8, 40)
    loss = fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.5)
    expected = linear_jsd_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.5)
    close(loss, expected, FP32_RTOL, FP32_FLOOR)


def test_identical_student_and_teacher_give_zero_loss_and_gradient():
    student_hidden, student_weight, *_ = make_pair((6,), 16, 16, 97, ignored=())
    for beta in (0.0, 0.5, 1.0):
        loss, grad_h, grad_w = student_grads(
            lambda: fused_linear_jsd(student_hidden, student_weight, student_hidden.detach(), student_weight.detach(),
                                     beta=beta),
            student_hidden, student_weight)
        assert abs(loss.item()) < 1e-6
        assert grad_h.abs().max() < 1e-6 and grad_w.abs().max() < 1e-6


def test_jsd_is_bounded_by_log_two_at_half():
    # JSD_0.5 <= log 2 for any pair of distributions: a check that does not go through the reference
    student_hidden, student_weight, teacher_hidden, teacher_weight, _ = make_pair((8,), 8, 8, 50, seed=3)
    loss = fused_linear_jsd(student_hidden, student_weight * 20, teacher_hidden, teacher_weight * 20, beta=0.5)
    assert 0.0 < loss.item() <= math.log(2.0) + 1e-6


def test_teacher_gets_no_gradient_and_frozen_student_head_none():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_pair((7,), 33, 45, 301)
    teacher_hidden.requires_grad_()
    teacher_weight.requires_grad_()
    student_weight.requires_grad_(False)
    fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels).backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None and student_weight.grad is None
    assert student_hidden.grad is not None and student_hidden.grad.abs().sum() > 0


def test_all_rows_ignored_gives_zero():
    pair = make_pair((4,), 8, 8, 30, ignored=range(4))
    loss = fused_linear_jsd(*pair)
    loss.backward()
    assert loss.item() == 0.0 and not pair[0].grad.any()


def test_bad_arguments_are_user_errors():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_pair((4,), 8, 12, 30)
    with pytest.raises(TunegraphError, match="beta=1.5"):
        fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta=1.5)
    with pytest.raises(TunegraphError, match="temperature=0.0"):
        fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature=0.0)
    with pytest.raises(TunegraphError, match="vocabulary"):
        fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight[:29], labels)
    with pytest.raises(TunegraphError, match="teacher hidden"):
        fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight[:, :8], labels)
