"""Distillation losses: the same-tokenizer KD against TRL 1.16's GKD loss and by hand (tau^2, alpha,
Hinton's gradient scaling), and ULD on hand-made distributions (sorting, padding, alignment, invariance)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tunegraph.training.objectives.distill import distillation_loss, uld_distance, uld_loss

trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")


def random_batch(seed: int, batch: int = 3, seq: int = 9, vocab: int = 37):
    """float64 student/teacher logits and labels with a masked prompt, a padded row and a ragged response."""
    generator = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, seq, vocab, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = 2 * torch.randn(batch, seq, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2, 4] = -100  # a masked token inside the response (a second turn's user message)
    return student, teacher, labels


def trl_jsd(student, teacher, labels, beta, temperature):
    """TRL's loss on the same inputs, shifted as GKDTrainer.compute_loss shifts them."""
    return trl_gkd.GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels=labels[:, 1:], beta=beta,
                                                   temperature=temperature, reduction="batchmean")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_trl_generalized_jsd(beta, temperature):
    student, teacher, labels = random_batch(int(beta * 10 + temperature * 100))
    ours = distillation_loss(student, teacher, labels, beta=beta, temperature=temperature, alpha=1.0)
    theirs = trl_jsd(student, teacher, labels, beta, temperature)
    assert_close(ours.distill, theirs.detach(), rtol=1e-10, atol=1e-12)
    # alpha = 1: the loss is tau^2 times TRL's (TRL has no tau^2), gradients included
    assert_close(ours.loss, temperature ** 2 * theirs, rtol=1e-10, atol=1e-12)
    (ours_grad,) = torch.autograd.grad(ours.loss, student)
    (trl_grad,) = torch.autograd.grad(temperature ** 2 * theirs, student)
    assert_close(ours_grad, trl_grad, rtol=1e-9, atol=1e-12)


def test_hard_label_mix_and_tau_squared_by_hand():
    """One scored position, vocabulary of 3, every number computed with math alone."""
    student_logits, teacher_logits, tau, alpha = [2.0, 0.5, -1.0], [0.0, 1.5, 0.3], 2.0, 0.3

    def softmax(values, t):
        exps = [math.exp(v / t) for v in values]
        return [e / sum(exps) for e in exps]

    p, q = softmax(teacher_logits, tau), softmax(student_logits, tau)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(softmax(student_logits, 1.0)[1])  # the label is token 1, at temperature 1
    # position 0 predicts labels[1]; labels[0] is never scored
    student = torch.tensor([[student_logits, [0.0, 0.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[teacher_logits, [5.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1]])
    result = distillation_loss(student, teacher, labels, beta=0.0, temperature=tau, alpha=alpha)
    assert result.distill.item() == pytest.approx(kl, rel=1e-12)
    assert result.ce.item() == pytest.approx(ce, rel=1e-12)
    assert result.loss.item() == pytest.approx(alpha * tau ** 2 * kl + (1 - alpha) * ce, rel=1e-12)


def test_tau_squared_keeps_the_soft_gradient_scale_across_temperatures():
    """Hinton et al. 2015, Sec. 2: the soft term's gradient shrinks as 1/tau^2 at high temperature, and the
    tau^2 factor undoes it. Zero-mean logits, as the paper's high-temperature argument assumes."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(1, 2, 64, generator=generator, dtype=torch.float64)
    teacher = torch.randn(1, 2, 64, generator=generator, dtype=torch.float64)
    student, teacher = student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True)
    labels = torch.tensor([[-100, 5]])
    norms, raw = {}, {}
    for tau in (20.0, 40.0):
        logits = student.clone().requires_grad_()
        result = distillation_loss(logits, teacher, labels, beta=0.0, temperature=tau, alpha=1.0)
        norms[tau] = torch.autograd.grad(result.loss, logits)[0].norm().item()
        logits = student.clone().requires_grad_()
        divergence = distillation_loss(logits, teacher, labels, beta=0.0, temperature=tau, alpha=1.0).loss / tau ** 2
        raw[tau] = torch.autograd.grad(divergence, logits)[0].norm().item()
    assert norms[40.0] / norms[20.0] == pytest.approx(1.0, abs=0.02)
    assert raw[20.0] / raw[40.0] == pytest.approx(4.0, rel=0.02)


def test_teacher_gets_no_gradient_and_an_empty_batch_is_zero():
    student, teacher, labels = random_batch(7)
    teacher.requires_grad_()
    result = distillation_loss(student, teacher, labels, beta=0.5, temperature=1.0, alpha=0.5)
    result.loss.backward()
    assert teacher.grad is None and student.grad is not None
    empty = distillation_loss(student, teacher, torch.full_like(labels, -100), alpha=0.5)
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad


def test_bad_settings_are_refused():
    student, teacher, labels = random_batch(1)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(student, teacher, labels, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(student, teacher, labels, alpha=-0.1)
    with pytest.raises(ValueError, match="one tokenizer"):
        distillation_loss(student, teacher[..., :-1], labels)


# --- ULD ------------------------------------------------------------------------------------------

def logits_of(probabilities: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probabilities], dtype=torch.float64)


def test_uld_distance_sorts_and_pads_by_hand():
    student = logits_of([0.5, 0.3, 0.2]).unsqueeze(0)
    teacher = logits_of([0.1, 0.6, 0.2, 0.1]).unsqueeze(0)
    # sorted: [0.5, 0.3, 0.2, 0] vs [0.6, 0.2, 0.1, 0.1] -> 0.1 + 0.1 + 0.1 + 0.1
    assert uld_distance(student, teacher).item() == pytest.approx(0.4, abs=1e-12)
    assert uld_distance(teacher, student).item() == pytest.approx(0.4, abs=1e-12)  # padding works either side


def test_uld_is_invariant_to_vocabulary_permutations():
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(5, 30, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5, 45, generator=generator, dtype=torch.float64)
    base = uld_distance(student, teacher)
    permuted = uld_distance(student[:, torch.randperm(30, generator=generator)],
                            teacher[:, torch.randperm(45, generator=generator)])
    assert_close(base, permuted, rtol=1e-12, atol=1e-12)
    # two vocabularies holding the same probabilities in another order are at distance 0
    assert uld_distance(student, student[:, torch.randperm(30, generator=generator)]).abs().max() < 1e-12
    assert base.min() > 0


def test_uld_aligns_responses_by_position_and_truncates_to_the_shorter():
    """The student's response has 2 tokens after a 3-token prompt; the teacher's 4 after a 1-token prompt.
    Pairs: student positions 2, 3 with teacher positions 0, 1; teacher positions 2, 3 are never read."""
    a, b = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    student = torch.zeros(1, 5, 3, dtype=torch.float64)
    student[0, 2], student[0, 3] = logits_of(a), logits_of(b)
    student.requires_grad_()
    teacher = torch.zeros(1, 5, 4, dtype=torch.float64)
    teacher[0, 0] = logits_of([0.6, 0.2, 0.1, 0.1])
    teacher[0, 1] = logits_of([0.25, 0.25, 0.25, 0.25])
    teacher[0, 2] = teacher[0, 3] = torch.tensor([50.0, 0.0, 0.0, 0.0])  # beyond the student's response
    student_labels = torch.tensor([[-100, -100, -100, 1, 2]])
    teacher_labels = torch.tensor([[-100, 0, 1, 2, 3]])
    result = uld_loss(student, teacher, student_labels, teacher_labels, alpha=1.0)
    first = abs(0.7 - 0.6) + abs(0.2 - 0.2) + abs(0.1 - 0.1) + abs(0 - 0.1)
    second = abs(0.5 - 0.25) + abs(0.3 - 0.25) + abs(0.2 - 0.25) + abs(0 - 0.25)
    assert result.distill.item() == pytest.approx((first + second) / 2, abs=1e-12)
    assert result.loss.item() == pytest.approx((first + second) / 2, abs=1e-12)
    ce = -(math.log(a[1]) + math.log(b[2])) / 2  # labels 1 and 2 predicted at positions 2 and 3
    assert result.ce.item() == pytest.approx(ce, abs=1e-12)
    mixed = uld_loss(student, teacher, student_labels, teacher_labels, alpha=0.25)
    assert mixed.loss.item() == pytest.approx(0.25 * (first + second) / 2 + 0.75 * ce, abs=1e-12)
    mixed.loss.backward()
    assert student.grad[0, [0, 1, 4]].abs().max() == 0 and student.grad[0, 2:4].abs().max() > 0
