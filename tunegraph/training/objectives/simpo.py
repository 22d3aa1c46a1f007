"""SimPO: a reference-free, length-normalized Bradley-Terry loss with a target margin."""

from __future__ import annotations

import torch

from tunegraph.training.objectives.base import (
    PreferenceLoss,
    as_float,
    check_label_smoothing,
    check_pair,
    check_positive,
    register,
    smoothed_sigmoid_loss,
)


@register("simpo", needs_reference=False, average_logps=True, batch="pairs",
          paper="https://arxiv.org/abs/2405.14734")
def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *,
               beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> PreferenceLoss:
    """Simple Preference Optimization (Meng, Xia & Chen 2024, https://arxiv.org/abs/2405.14734):

        r(y) = (beta / |y|) log pi(y|x)                           (average log-prob, no reference)
        L    = mean_batch[ -log sigma(r(y_w) - r(y_l) - gamma) ]

    with the inputs being per-token AVERAGE log-probs (registry ``average_logps=True``) and gamma > 0
    the target reward margin. ``label_smoothing`` eps gives the conservative form
    ``-(1-eps) log sigma(z) - eps log sigma(-z)``, z = r(y_w) - r(y_l) - gamma (also in the SimPO
    code and TRL); eps = 0 is the paper's loss.

    Matches TRL 1.16 ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"``,
    ``alpha=0`` (no AlphaPO transform) and ``cpo_alpha=0`` (TRL's CPO trainer otherwise adds the
    CPO behaviour-cloning NLL, giving "CPO-SimPO"). TRL's ``simpo_gamma`` is gamma itself: it forms
    ``beta * ((avg_w - avg_r) - simpo_gamma / beta)``, which is the same ``r(y_w) - r(y_l) - gamma``.
    (The SimPO code's ``gamma_beta_ratio`` hyperparameter is gamma / beta instead; convert with
    gamma = ratio * beta.) Rewards are ``beta * avg log pi``, detached, as TRL logs them; they carry
    no margin. The defaults (beta 2, gamma 1) are in the ranges the paper tunes over; TRL's CPOConfig
    defaults (beta 0.1, gamma 0.5) are CPO's, not SimPO's.

    Correction to the seed survey: it writes the reward as ``(1/|y|) sum_t log pi(y_t|x, y_<t) - gamma``.
    The paper's reward is ``(beta/|y|) log pi(y|x)``: beta scales it, and the margin gamma belongs to
    the Bradley-Terry objective (the chosen reward must exceed the rejected one by gamma), not to
    the reward of a single response (subtracting gamma from both rewards would cancel).
    """
    check_pair(policy_chosen_logps, policy_rejected_logps)
    check_positive(beta=beta)
    check_label_smoothing(label_smoothing)
    chosen_rewards = beta * as_float(policy_chosen_logps)
    rejected_rewards = beta * as_float(policy_rejected_logps)
    losses = smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return PreferenceLoss(losses.mean(), chosen_rewards.detach(), rejected_rewards.detach())
