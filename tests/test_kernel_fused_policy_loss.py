"""Fused, chunked GRPO/DAPO policy loss against the naive path (full logits -> token_logps -> loss).

The naive path is what :func:`tunegraph.training.grpo.make_grpo_step` does: ``token_logps`` over
``F.linear(hidden, W, b)``, the mask of completion tokens (times the groups kept by dynamic
sampling), then ``clipped_policy_loss``. Shapes are odd on purpose (6 sequences = 2 groups of 3,
11 positions, hidden 37, vocab 503); completions start and end at different positions.

Tolerances as in tests/test_kernel_fused_preference.py: float32 ``rtol=1e-5`` with a floor of 1e-5 x
the largest entry (sums reassociated across chunks: a few ulp per term); bfloat16 2^-6 of the
largest entry against both the naive bf16 path and the float32 truth (the weight gradient is rounded
to bf16 per chunk instead of once).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tunegraph.kernels.fused_linear_policy_loss import fused_linear_policy_loss
from tunegraph.training.objectives.grpo import clipped_policy_loss
from tunegraph.training.objectives.logps import token_logps

SEQUENCES, SEQ, HIDDEN, VOCAB = 6, 11, 37, 503
FP32 = 1e-5
BF16 = 2.0**-6
MODES = {  # the two recipes of tunegraph.training.objectives.grpo
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "beta": 0.04, "aggregation": "sequence"},
    "dapo": {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, "aggregation": "token"},
}


def make_labels() -> torch.Tensor:
    """Completion tokens after a 3-6 token prompt, then 0-4 positions of padding."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, VOCAB, (SEQUENCES, SEQ), generator=generator)
    for row in range(SEQUENCES):
        labels[row, :3 + row % 4] = -100
        labels[row, SEQ - row % 5:] = -100
    return labels


def make_head(dtype: torch.dtype, bias: bool = True):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQUENCES, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3
    bias_value = torch.randn(VOCAB, generator=generator) * 0.1
    tensors = [hidden, weight] + ([bias_value] if bias else [])
    return tuple(t.to(dtype).requires_grad_() for t in tensors) + ((None,) if not bias else ())


def make_rollout(labels: torch.Tensor):
    """``(advantages, old_logps, ref_logps)``: group-normalized-looking advantages, and per-token
    log-probs of the old / reference policies near the current ones, far enough that the ratio
    leaves [1 - eps, 1 + eps] for some tokens."""
    hidden, weight, bias = make_head(torch.float32)
    with torch.no_grad():
        current, mask = token_logps(F.linear(hidden, weight, bias), labels)
    generator = torch.Generator().manual_seed(5)
    advantages = torch.tensor([1.2, -0.3, -0.9, 0.7, 0.4, -1.1])
    old = (current + 0.3 * torch.randn(current.shape, generator=generator)) * mask
    ref = (current + 0.2 * torch.randn(current.shape, generator=generator)) * mask
    return advantages, old, ref


def naive_loss(hidden, weight, bias, labels, advantages, old_logps, ref_logps, keep_rows=None, **settings):
    logps, mask = token_logps(F.linear(hidden, weight, bias), labels)
    if keep_rows is not None:  # dynamic sampling, as make_grpo_step masks dropped groups
        mask = mask & keep_rows.unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    return clipped_policy_loss(logps, old, advantages, mask, ref_logps=ref_logps, **settings)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    expected = expected.detach().float()
    assert_close(actual.detach().float(), expected, rtol=tolerance,
                 atol=max(tolerance * float(expected.abs().max()), 1e-12))


@pytest.mark.parametrize("off_policy", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("chunk_size", [1, 4, SEQUENCES + 3])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_fused_matches_naive_in_float32(mode, chunk_size, off_policy):
    labels = make_labels()
    advantages, old, ref = make_rollout(labels)
    old = old if off_policy else None
    head = make_head(torch.float32)
    expected, expected_metrics = naive_loss(*head, labels, advantages, old, ref, **MODES[mode])
    expected_grads = torch.autograd.grad(expected, head)
    actual, metrics = fused_linear_policy_loss(*head[:2], labels, advantages, bias=head[2], old_logps=old,
                                               ref_logps=ref, chunk_size=chunk_size, **MODES[mode])
    actual_grads = torch.autograd.grad(actual, head)

    assert_near(actual, expected, FP32)
    for got, want in zip(actual_grads, expected_grads):
        assert want.abs().max() > 0
        assert_near(got, want, FP32)
    assert set(metrics) == set(expected_metrics)
    for name in expected_metrics:
        assert_near(metrics[name], expected_metrics[name], FP32)
    if off_policy:  # the clipped branch is exercised, not only the on-policy ratio of 1
        assert float(expected_metrics["clip_fraction"]) > 0.1
    if MODES[mode]["beta"]:
        assert float(expected_metrics["kl"]) > 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fused_matches_naive_in_bfloat16(mode):
    labels = make_labels()
    advantages, old, ref = make_rollout(labels)
    truth_head = tuple(t.detach().bfloat16().float().requires_grad_() for t in make_head(torch.float32))
    truth, _ = naive_loss(*truth_head, labels, advantages, old, ref, **MODES[mode])
    truth_grads = torch.autograd.grad(truth, truth_head)
    naive_head, fused_head = make_head(torch.bfloat16), make_head(torch.bfloat16)
    expected, _ = naive_loss(*naive_head, labels, advantages, old, ref, **MODES[mode])
    expected_grads = torch.autograd.grad(expected, naive_head)
    actual, _ = fused_linear_policy_loss(*fused_head[:2], labels, advantages, bias=fused_head[2], old_logps=old,
                                         ref_logps=ref, chunk_size=4, **MODES[mode])
    actual_grads = torch.autograd.grad(actual, fused_head)

    assert_near(actual, expected, BF16)
    assert_near(actual, truth, BF16)
    for got, want, exact in zip(actual_grads, expected_grads, truth_grads):
        assert got.dtype == torch.bfloat16
        assert_near(got, want, BF16)
        assert_near(got, exact, BF16)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_frozen_head_without_bias_gives_hidden_gradients_only(mode):
    labels = make_labels()
    advantages, old, ref = make_rollout(labels)
    hidden, weight, _ = make_head(torch.float32, bias=False)
    weight.requires_grad_(False)
    expected, _ = naive_loss(hidden, weight, None, labels, advantages, old, ref, **MODES[mode])
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    actual, _ = fused_linear_policy_loss(hidden, weight, labels, advantages, old_logps=old, ref_logps=ref,
                                         chunk_size=4, **MODES[mode])
    actual.backward()
    assert weight.grad is None
    assert_near(hidden.grad, expected_grad, FP32)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_dropped_groups_as_unscored_rows_equal_the_masked_naive_loss(mode):
    """DAPO dynamic sampling: the trainer zeroes a dropped group's mask; the fused op takes the same
    rows with labels -100 (no logits computed for them) and must give the same loss and gradients,
    the sequence mean still over all rows."""
    labels = make_labels()
    advantages, old, ref = make_rollout(labels)
    keep = torch.tensor([True] * 3 + [False] * 3)
    head = make_head(torch.float32)
    expected, _ = naive_loss(*head, labels, advantages, old, ref, keep_rows=keep, **MODES[mode])
    expected_grads = torch.autograd.grad(expected, head)
    dropped = labels.masked_fill(~keep.unsqueeze(1), -100)
    actual, _ = fused_linear_policy_loss(*head[:2], dropped, advantages, bias=head[2], old_logps=old, ref_logps=ref,
                                         chunk_size=2, **MODES[mode])
    actual_grads = torch.autograd.grad(actual, head)
    assert_near(actual, expected, FP32)
    for got, want in zip(actual_grads, expected_grads):
        assert_near(got, want, FP32)
    assert actual_grads[0][3:].abs().max() == 0


def test_inputs_that_do_not_fit_are_refused():
    labels = make_labels()
    advantages, old, ref = make_rollout(labels)
    hidden, weight, bias = make_head(torch.float32)
    with pytest.raises(ValueError, match="one per sequence"):
        fused_linear_policy_loss(hidden, weight, labels, advantages[1:])
    with pytest.raises(ValueError, match="per-token log-probs"):
        fused_linear_policy_loss(hidden, weight, labels, advantages, old_logps=old[:, 1:])
    with pytest.raises(ValueError, match="needs reference log-probs"):
        fused_linear_policy_loss(hidden, weight, labels, advantages, beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        fused_linear_policy_loss(hidden, weight, labels, advantages, aggregation="group")
