"""Distillation objectives over logits: same-tokenizer KD (forward/reverse KL, generalized JSD) and ULD.

**Same tokenizer** (:func:`distillation_loss`). For a causal LM the logits at position t predict the
token at t + 1, so with labels aligned to the input ids (-100 on prompt and padding) the scored set is
``S = {t : labels[t + 1] != -100}`` (the response tokens). With teacher and student logits ``z_T``,
``z_S`` at t, the tempered distributions ``P = softmax(z_T / tau)`` (teacher), ``Q = softmax(z_S / tau)``
(student) and ``beta`` in [0, 1]::

    D_beta(P, Q) = KL(P || Q)                                             beta = 0  (forward KL)
                 = KL(Q || P)                                             beta = 1  (reverse KL)
                 = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q     otherwise
    KD  = (1 / |S|) sum_{t in S} D_beta(P_t, Q_t)
    CE  = (1 / |S|) sum_{t in S} -log softmax(z_S,t)[y_{t+1}]             (hard labels, temperature 1)
    L   = alpha * tau^2 * KD + (1 - alpha) * CE

``D_beta`` is the generalized JSD of GKD (Agarwal et al. 2024, https://arxiv.org/abs/2306.13649,
Eq. 1) with its two ends defined as the KLs, exactly as TRL 1.16's
``GKDTrainer.generalized_jsd_loss`` (checked on identical inputs in ``tests/test_distill_loss.py``; TRL
has no tau^2 and no CE term). The tau^2 factor is Hinton et al. 2015 (https://arxiv.org/abs/1503.02531,
Sec. 2): the gradient of the soft term w.r.t. a student logit is ``(Q - P) / tau``, and with
zero-mean logits at high tau ``Q - P ~ (z_S - z_T) / (N tau)``, so it shrinks as ``1 / tau^2``;
multiplying by ``tau^2`` keeps the soft and hard terms' relative weight when tau changes. The CE uses
the same student logits at temperature 1 (Hinton: "exactly the same logits ... at a temperature of 1").
Forward KL has the same student gradient as Hinton's soft-target cross-entropy ``H(P, Q)``
(they differ by the teacher entropy, a constant).

The seed survey writes ``L_KD = alpha L_CE(y, y_S) + (1 - alpha) T^2 KL(softmax(z_T / tau) ||
softmax(z_S / tau))``. Checked against Hinton: the divergence direction (teacher first, forward KL), the
temperature on both softmaxes and the squared-temperature factor on the soft term only are right. Two
things to read with care: (1) its ``T^2`` is the temperature ``tau`` squared (``T`` also names the
teacher there); (2) its alpha weighs the hard-label CE, whereas here alpha weighs the distillation term
(``alpha_here = 1 - alpha_seed``), so ``alpha: 1`` is pure distillation. It also leaves implicit that the
CE is at temperature 1 and, for LMs, that both terms are token means over the response positions.

**Different tokenizers** (:func:`uld_loss`): Universal Logit Distillation (Boizard et al. 2024,
https://arxiv.org/abs/2402.12030). The vocabularies share no index, so ULD replaces the KL by an
optimal-transport (Wasserstein-1) distance between the two next-token distributions and, as the paper
does, uses its closed form: the L1 distance between the probability vectors sorted in decreasing order,
the smaller vocabulary padded with zeros::

    W(P, Q) = sum_i | sort_desc(Q)_i - sort_desc(P)_i |

(invariant under any permutation of either vocabulary). Sequence alignment: the two tokenizers cut the
same text into different numbers of tokens, and ULD pairs positions by their index in the response:
the k-th response-predicting position of the student with the k-th of the teacher, truncated to the
shorter response (the authors' code, ``llm-recipes`` ``DistillationLoss``: answers aligned at their
first token, ``size = min(student_answer_size, teacher_answer_size)``). We do the same per row, with the
response being every labelled token (all assistant turns, in order). Two choices of ours: the distance
is a token mean over all aligned positions of the batch (the authors average per sequence, then over
the batch; equal when the aligned lengths are), and it is mixed with the student's hard-label CE by the
same alpha as above, ``L = alpha W + (1 - alpha) CE`` (the paper's ``CE + lambda W`` up to scale, with
``lambda = alpha / (1 - alpha)``). One temperature tempers both distributions; ULD has no tau^2 factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunegraph.training.chat_encoding import IGNORE_INDEX
from tunegraph.training.objectives.base import as_float


@dataclass(frozen=True)
class DistillLoss:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the student logits
    distill: torch.Tensor  # detached: KD (the mean D_beta, before alpha and tau^2) or the mean ULD distance
    ce: torch.Tensor  # detached: the student's hard-label cross-entropy (token mean)


def check_settings(beta: float, temperature: float, alpha: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 forward KL, 1 reverse KL), got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (weight of the distillation term), got {alpha}")


def response_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict a labelled token, ``[N, V]`` (half precision upcast to float32),
    and those tokens ``[N]``."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align as "
                         f"[batch, seq, vocab] and [batch, seq]")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    return as_float(logits[:, :-1][scored]), targets[scored]


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float) -> torch.Tensor:
    """Per-row ``D_beta(softmax(teacher / tau), softmax(student / tau))`` of ``[N, V]`` logits, ``[N]``."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
            + (1.0 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))


def _token_mean(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # no scored token in the batch: 0 with the graph kept, as a masked cross-entropy over nothing would be
    return values.mean() if values.numel() else like.sum() * 0.0


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      beta: float = 0.0, temperature: float = 1.0, alpha: float = 0.5) -> DistillLoss:
    """``alpha * tau^2 * KD + (1 - alpha) * CE`` (module docstring) for one shared vocabulary.

    ``student_logits``, ``teacher_logits``: ``[B, T, V]`` (half precision is computed in float32);
    ``labels``: ``[B, T]`` aligned with the input ids, -100 where not scored. The teacher gets no gradient.
    """
    check_settings(beta, temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; one tokenizer gives one shape (else use uld_loss)")
    student, targets = response_rows(student_logits, labels)
    teacher, _ = response_rows(teacher_logits.detach(), labels)
    kd = _token_mean(generalized_jsd(student, teacher, beta, temperature), student_logits)
    ce = _token_mean(F.cross_entropy(student, targets, reduction="none"), student_logits)
    return DistillLoss(alpha * temperature ** 2 * kd + (1.0 - alpha) * ce, kd.detach(), ce.detach())


def sorted_probabilities(logits: torch.Tensor, temperature: float, width: int) -> torch.Tensor:
    """``softmax(logits / tau)`` per row sorted in decreasing order, zero-padded to ``width`` columns."""
    probs = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True).values
    return F.pad(probs, (0, width - probs.shape[-1]))


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row ULD distance ``sum_i |sort_desc(Q)_i - sort_desc(P)_i|`` of ``[N, Vs]`` and ``[N, Vt]`` logits."""
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    student = sorted_probabilities(as_float(student_logits), temperature, width)
    teacher = sorted_probabilities(as_float(teacher_logits.detach()), temperature, width)
    return (student - teacher).abs().sum(-1)


def aligned_response_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_labels: torch.Tensor,
                          teacher_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``[N, Vs]``, ``[N, Vt]`` of response positions paired by their index in
    each row's response, truncated per row to the shorter response (ULD's alignment)."""
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student batch {student_logits.shape[0]} != teacher batch {teacher_logits.shape[0]}")
    student_rows, teacher_rows = [], []
    for row in range(student_logits.shape[0]):
        student_pos = (student_labels[row, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        teacher_pos = (teacher_labels[row, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        n = min(len(student_pos), len(teacher_pos))
        student_rows.append(student_logits[row, student_pos[:n]])
        teacher_rows.append(teacher_logits[row, teacher_pos[:n]])
    return torch.cat(student_rows), torch.cat(teacher_rows)


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_labels: torch.Tensor,
             teacher_labels: torch.Tensor, *, temperature: float = 1.0, alpha: float = 0.5) -> DistillLoss:
    """``alpha * W + (1 - alpha) * CE`` across tokenizers (module docstring).

    ``student_logits`` ``[B, Ts, Vs]`` with ``student_labels`` ``[B, Ts]``; ``teacher_logits`` ``[B, Tt, Vt]``
    with ``teacher_labels`` ``[B, Tt]``: row b of both is the same conversation, each encoded by its own
    tokenizer and chat template. Labels are aligned with the input ids, -100 where not scored.
    """
    check_settings(0.0, temperature, alpha)
    student_aligned, teacher_aligned = aligned_response_rows(student_logits, teacher_logits.detach(),
                                                             student_labels, teacher_labels)
    distance = _token_mean(uld_distance(student_aligned, teacher_aligned, temperature), student_logits)
    student, targets = response_rows(student_logits, student_labels)
    ce = _token_mean(F.cross_entropy(student, targets, reduction="none"), student_logits)
    return DistillLoss(alpha * distance + (1.0 - alpha) * ce, distance.detach(), ce.detach())
