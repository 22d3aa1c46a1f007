"""Fused, chunked preference losses against the naive path (full logits -> logps -> objective).

The naive path is what :func:`tunegraph.training.preference.make_preference_step` does with the
model's logits: ``sequence_logps`` over ``F.linear(hidden, W, b)``, then the registered objective
(with ``token_mean_nll`` for CPO/ORPO). Shapes are odd on purpose (3 pairs, 11 positions, hidden 37,
vocab 503), prompts and padding differ per row, one row scores a single token.

Tolerances. float32: both paths evaluate the same formulas in float32; the fused one sums in another
order (per chunk, over the scored rows only, ``index_add`` instead of ``sum``), which moves results
by a few ulp per term: ``rtol=1e-5`` with an absolute floor of 1e-5 x the largest entry (~100 ulp).
A wrong weight, sign or normalization moves them by >= 1e-2. bfloat16 (unit roundoff 2^-8): the
loss is bitwise-close because the logits are the same bf16 matmul, upcast before the log-softmax;
the weight/bias gradients are rounded to bf16 once by the naive matmul but per chunk (then summed in
float32) by the fused path, so they differ by a few roundoffs of the largest entry: 2^-6 of it. The
fused bf16 result must also lie that close to the float32 truth, so it is not merely as wrong as the
naive bf16 path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tunegraph.kernels import fused_linear_preference as fused_module
from tunegraph.kernels.fused_linear_preference import (
    fused_linear_preference_loss,
    fused_linear_sequence_logps,
    fused_linear_token_logps,
)
from tunegraph.training.objectives import get_objective, kto_reference_point, sequence_logps, token_mean_nll
from tunegraph.training.objectives.logps import token_logps

PAIRS, SEQ, HIDDEN, VOCAB = 3, 11, 37, 503
OBJECTIVES = ["dpo", "ipo", "orpo", "simpo", "cpo", "kto"]
HYPERPARAMETERS = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.1},
    "ipo": {"beta": 0.5},
    "orpo": {"lam": 0.5},
    "simpo": {"beta": 2.0, "gamma": 0.5},
    "cpo": {"beta": 0.1, "alpha": 1.0},
    "kto": {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.33},
}
FP32 = 1e-5
BF16 = 2.0**-6
MIXED = torch.tensor([True, False, True])


def make_labels(rows: int, seed: int) -> torch.Tensor:
    """Token ids with a masked prompt of 2-5 tokens and 0-3 padding positions per row; row 1 scores
    a single token."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)
    for row in range(rows):
        prompt = 2 + row % 4
        labels[row, :prompt] = -100
        labels[row, SEQ - row % 4:] = -100
    labels[1, :SEQ - 1] = -100
    labels[1, SEQ - 1] = 17
    return labels


def make_head(dtype: torch.dtype, seed: int = 0, bias: bool = True):
    """``(hidden [2n, T, H], weight [V, H], bias [V] | None)``, leaves requiring grad, in ``dtype``
    (drawn in float32 first, so the bf16 case rounds the same values)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * PAIRS, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3  # logits spread over a few units
    bias_value = torch.randn(VOCAB, generator=generator) * 0.1
    tensors = [hidden, weight] + ([bias_value] if bias else [])
    return tuple(t.to(dtype).requires_grad_() for t in tensors) + ((None,) if not bias else ())


def make_reference(labels: torch.Tensor, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs near the policy's, so the losses are neither saturated nor trivial. For
    KTO the KL rows' reference lies BELOW the policy by different amounts per row: z0 = mean > 0,
    and a per-chunk z0 would differ from it."""
    hidden, weight, bias = make_head(torch.float32)
    with torch.no_grad():
        logps, _ = sequence_logps(F.linear(hidden, weight, bias), labels, average)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(2 * PAIRS, generator=generator)
    return logps[:PAIRS] + noise[:PAIRS], logps[PAIRS:] - torch.tensor([0.5, 3.0, 1.0]) - 0.1 * noise[PAIRS:]


def naive_loss(name: str, hidden, weight, bias, labels, reference, desirable):
    """The trainer's path: full logits, ``sequence_logps``, the objective (as make_preference_step)."""
    objective = get_objective(name)
    logps, n_tokens = sequence_logps(F.linear(hidden, weight, bias), labels, objective.average_logps)
    first, second = logps[:PAIRS], logps[PAIRS:]
    if objective.batch == "unpaired":
        return objective.fn(first, reference[0], desirable, second, reference[1], **HYPERPARAMETERS[name])
    args = [first, second]
    if objective.needs_reference:
        args += list(reference)
    if objective.needs_chosen_nll:
        sums = first * n_tokens[:PAIRS] if objective.average_logps else first
        args.append(token_mean_nll(sums, n_tokens[:PAIRS]))
    return objective.fn(*args, **HYPERPARAMETERS[name])


def fused_loss(name: str, hidden, weight, bias, labels, reference, desirable, chunk_size: int):
    return fused_linear_preference_loss(name, hidden, weight, labels, bias=bias, reference=reference,
                                        desirable=desirable, hyperparameters=HYPERPARAMETERS[name],
                                        chunk_size=chunk_size)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    expected = expected.detach().float()
    floor = tolerance * float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual.float(), expected, rtol=tolerance, atol=max(floor, 1e-12))


def inputs_for(name: str, labels_seed: int = 1):
    labels = make_labels(2 * PAIRS, labels_seed)
    return labels, make_reference(labels, get_objective(name).average_logps)


@pytest.mark.parametrize("chunk_size", [1, 2, PAIRS + 2])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_fused_matches_naive_in_float32(name, chunk_size):
    labels, reference = inputs_for(name)
    head = make_head(torch.float32)
    expected = naive_loss(name, *head, labels, reference, MIXED)
    expected_grads = torch.autograd.grad(expected.loss, head)
    actual = fused_loss(name, *head, labels, reference, MIXED, chunk_size)
    actual_grads = torch.autograd.grad(actual.loss, head)

    assert_near(actual.loss, expected.loss, FP32)
    for got, want in zip(actual_grads, expected_grads):
        assert want.abs().max() > 0
        assert_near(got, want, FP32)
    assert_near(actual.chosen_rewards, expected.chosen_rewards, FP32)
    assert_near(actual.rejected_rewards, expected.rejected_rewards, FP32)
    assert set(actual.metrics) == set(expected.metrics)
    for metric in expected.metrics:
        assert_near(actual.metrics[metric], expected.metrics[metric], FP32)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_fused_matches_naive_in_bfloat16(name):
    labels, reference = inputs_for(name)
    truth_head = make_head(torch.float32)
    # the float32 truth on the bf16-rounded inputs
    truth_head = tuple(t.detach().bfloat16().float().requires_grad_() for t in truth_head)
    truth = naive_loss(name, *truth_head, labels, reference, MIXED)
    truth_grads = torch.autograd.grad(truth.loss, truth_head)
    naive_head, fused_head = make_head(torch.bfloat16), make_head(torch.bfloat16)
    expected = naive_loss(name, *naive_head, labels, reference, MIXED)
    expected_grads = torch.autograd.grad(expected.loss, naive_head)
    actual = fused_loss(name, *fused_head, labels, reference, MIXED, chunk_size=2)
    actual_grads = torch.autograd.grad(actual.loss, fused_head)

    assert actual.loss.dtype == torch.float32
    assert_near(actual.loss, expected.loss, BF16)
    assert_near(actual.loss, truth.loss, BF16)
    for got, want, exact, leaf in zip(actual_grads, expected_grads, truth_grads, fused_head):
        assert got.dtype == leaf.dtype == torch.bfloat16
        assert_near(got, want, BF16)
        assert_near(got, exact, BF16)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_frozen_head_without_bias_gives_hidden_gradients_only(name):
    labels, reference = inputs_for(name)
    hidden, weight, _ = make_head(torch.float32, bias=False)
    weight.requires_grad_(False)  # a frozen / LoRA-wrapped LM head
    expected = naive_loss(name, hidden, weight, None, labels, reference, MIXED)
    (expected_grad,) = torch.autograd.grad(expected.loss, hidden)
    actual = fused_loss(name, hidden, weight, None, labels, reference, MIXED, chunk_size=2)
    actual.loss.backward()

    assert weight.grad is None
    assert_near(hidden.grad, expected_grad, FP32)


@pytest.mark.parametrize("desirable", [[True, False, True], [False, True, False], [True, True, True],
                                       [False, False, False]])
def test_kto_uses_the_batch_reference_point_in_every_chunk(desirable):
    """One completion per chunk: a chunk is all desirable or all undesirable, and a per-chunk z0
    would be 0.5, 3.0 or 1.0 (see make_reference) instead of the batch's 1.5."""
    desirable = torch.tensor(desirable)
    labels, reference = inputs_for("kto")
    head = make_head(torch.float32)
    expected = naive_loss("kto", *head, labels, reference, desirable)
    expected_grads = torch.autograd.grad(expected.loss, head)
    actual = fused_loss("kto", *head, labels, reference, desirable, chunk_size=1)
    actual_grads = torch.autograd.grad(actual.loss, head)

    with torch.no_grad():
        kl_logps, _ = sequence_logps(F.linear(*head[:2], head[2])[PAIRS:], labels[PAIRS:], average=False)
    z0 = kto_reference_point(kl_logps, reference[1])
    assert 1.0 < float(z0) < 2.0
    assert_near(actual.metrics["kl"], z0, FP32)
    assert_near(actual.loss, expected.loss, FP32)
    for got, want in zip(actual_grads, expected_grads):
        assert_near(got, want, FP32)
    assert actual_grads[0][PAIRS:].abs().max() == 0  # z0 is detached: no gradient reaches the KL rows


def test_backward_scales_the_gradients_by_the_incoming_gradient():
    labels, reference = inputs_for("dpo")
    head = make_head(torch.float32)
    unit = torch.autograd.grad(fused_loss("dpo", *head, labels, reference, None, 2).loss, head)
    scaled = fused_loss("dpo", *head, labels, reference, None, 2).loss * 2.5 + head[0].sum()
    grads = torch.autograd.grad(scaled, head)
    assert_near(grads[0], unit[0] * 2.5 + 1, FP32)
    for got, want in zip(grads[1:], unit[1:]):
        assert_near(got, want * 2.5, FP32)


def test_without_grad_mode_it_only_computes_the_loss():
    labels, reference = inputs_for("simpo")
    head = make_head(torch.float32)
    expected = fused_loss("simpo", *head, labels, reference, None, 2).loss
    with torch.no_grad():
        loss = fused_loss("simpo", *head, labels, reference, None, 2).loss
    assert loss.grad_fn is None and not loss.requires_grad
    assert_near(loss, expected, FP32)


def test_logits_exist_for_one_chunk_of_scored_tokens_at_a_time(monkeypatch):
    """Spy on the head's matmul: every call is 2-D over at most one chunk's scored tokens, never the
    [2n, T, V] logits of the naive path."""
    labels, reference = inputs_for("dpo")
    head = make_head(torch.float32)
    shapes = []
    real_linear = F.linear

    def spy(x, w, b=None):
        shapes.append(tuple(x.shape))
        return real_linear(x, w, b)

    monkeypatch.setattr(fused_module.F, "linear", spy)
    torch.autograd.grad(fused_loss("dpo", *head, labels, reference, None, chunk_size=1).loss, head)
    scored = (labels[:, 1:] != -100).sum(-1)
    largest_chunk = int((scored[:PAIRS] + scored[PAIRS:]).max())
    assert len(shapes) == PAIRS
    assert all(len(shape) == 2 and shape[0] <= largest_chunk for shape in shapes)


@pytest.mark.parametrize("average", [False, True])
def test_chunked_log_probs_match_logps(average):
    labels = make_labels(2 * PAIRS, seed=3)
    hidden, weight, bias = make_head(torch.float32)
    logits = F.linear(hidden, weight, bias).detach()
    expected, expected_counts = sequence_logps(logits, labels, average)
    actual, counts = fused_linear_sequence_logps(hidden, weight, labels, average, bias=bias, chunk_size=4)
    assert_near(actual, expected, FP32)
    assert torch.equal(counts, expected_counts)
    expected_tokens, expected_mask = token_logps(logits, labels)
    tokens, mask = fused_linear_token_logps(hidden, weight, labels, bias=bias, chunk_size=4)
    assert_near(tokens, expected_tokens, FP32)
    assert torch.equal(mask, expected_mask)


def test_an_unscored_sequence_has_no_average_in_either_path():
    labels = make_labels(2 * PAIRS, seed=1)
    labels[2, :] = -100
    hidden, weight, bias = make_head(torch.float32)
    with pytest.raises(ValueError, match="no labelled tokens"):
        sequence_logps(F.linear(hidden, weight, bias), labels, average=True)
    with pytest.raises(ValueError, match="no labelled tokens"):
        fused_linear_preference_loss("simpo", hidden, weight, labels, bias=bias, chunk_size=2)


def test_inputs_that_do_not_fit_the_objective_are_refused():
    labels, reference = inputs_for("dpo")
    hidden, weight, bias = make_head(torch.float32)
    with pytest.raises(ValueError, match="even number of rows"):
        fused_linear_preference_loss("simpo", hidden[1:], weight, labels[1:])
    with pytest.raises(ValueError, match="needs reference log-probs"):
        fused_linear_preference_loss("dpo", hidden, weight, labels)
    with pytest.raises(ValueError, match="needs ``desirable``"):
        fused_linear_preference_loss("kto", hidden, weight, labels, reference=reference)
    with pytest.raises(ValueError, match="do not align"):
        fused_linear_preference_loss("simpo", hidden, weight, labels[:, 1:])
    with pytest.raises(ValueError, match="is not \\[vocab"):
        fused_linear_preference_loss("simpo", hidden, weight[:, 1:], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_preference_loss("simpo", hidden, weight, labels, chunk_size=0)
