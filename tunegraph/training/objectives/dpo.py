"""DPO (with conservative label smoothing) and IPO: pairwise losses against a frozen reference.

Both score a pair by the reference-corrected log-likelihood ratio

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

and differ in what they do with it: DPO fits the Bradley-Terry likelihood ``sigma(beta h)``,
IPO regresses ``h`` onto the fixed target ``1 / (2 tau)``.
"""

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


@register("dpo", needs_reference=True, average_logps=False, batch="pairs",
          paper="https://arxiv.org/abs/2305.18290")
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLoss:
    """Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7),
    with the conservative-DPO label smoothing eps (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf):

        r(y)  = beta * [log pi(y|x) - log pi_ref(y|x)]           (implicit reward; summed log-probs)
        L     = mean_batch[ -(1 - eps) log sigma(r(y_w) - r(y_l)) - eps log sigma(r(y_l) - r(y_w)) ]

    ``eps`` is the probability that a preference label is flipped, in [0, 0.5); eps = 0 is plain
    DPO. At pi = pi_ref the loss is log 2 for every eps.

    Matches TRL 1.16 ``DPOTrainer._compute_loss`` with ``loss_type="sigmoid"`` (reverse-KL, no
    ``ld_alpha``, no WPO weighting) for eps = 0, and for eps > 0 the smoothed form of TRL's
    ``CPOTrainer.cpo_loss(loss_type="sigmoid")`` applied to the reference-corrected log-ratios (the
    cDPO formula earlier TRL versions used in ``DPOTrainer.dpo_loss``). Caution: TRL 1.16's DPO
    "sigmoid" loss IGNORES ``label_smoothing`` (it only feeds "robust", "exo_pair" and "aot*"); rDPO
    (``loss_type="robust"``) is a different, unbiased estimator, not cDPO. Rewards are TRL's
    ``beta * (policy - reference)`` log-probs, detached.

    The seed survey's DPO formula (Eq. for L_DPO) is correct; it states no label smoothing.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    check_positive(beta=beta)
    check_label_smoothing(label_smoothing)
    chosen_logratios = as_float(policy_chosen_logps) - as_float(reference_chosen_logps)
    rejected_logratios = as_float(policy_rejected_logps) - as_float(reference_rejected_logps)
    losses = smoothed_sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return PreferenceLoss(losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register("ipo", needs_reference=True, average_logps=True, batch="pairs",
          paper="https://arxiv.org/abs/2310.12036")
def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, *,
             beta: float = 0.1) -> PreferenceLoss:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", https://arxiv.org/abs/2310.12036, Eq. 17):

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L = mean_batch[ (h - 1 / (2 tau))^2 ]                     with tau = ``beta``

    The log-probs are per-token AVERAGES (``sequence_logps(..., average=True)``, the registry's
    ``average_logps=True``), so h is the difference of per-token log-ratios. The paper writes h with
    sequence log-likelihoods; TRL normalizes by the completion length because the squared loss
    otherwise scales with length, and states the IPO authors confirmed the paper's results use the
    normalized form. Matches TRL 1.16 ``DPOTrainer._compute_loss`` with ``loss_type="ipo"``.

    Rewards are ``beta * (policy - reference)`` of the AVERAGE log-probs. (TRL logs
    ``beta * (policy - reference)`` of the SUMMED log-probs for every loss type, IPO included, so
    logged IPO rewards differ from TRL's by the factor |y|; the loss does not.)

    The seed survey gives no IPO formula; its table dates IPO 2024 (arXiv preprint October 2023,
    AISTATS 2024) and describes it loosely as "regularization": IPO replaces DPO's log-sigmoid of the
    ratio by a squared regression onto a finite target, which keeps the KL regularization effective
    when preferences are deterministic (DPO's optimum then sends h to infinity).
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    check_positive(beta=beta)
    chosen_logratios = as_float(policy_chosen_logps) - as_float(reference_chosen_logps)
    rejected_logratios = as_float(policy_rejected_logps) - as_float(reference_rejected_logps)
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
