"""KTO: a prospect-theoretic loss for unpaired good/bad completions."""

from __future__ import annotations

import torch

from tunegraph.training.objectives.base import PreferenceLoss, as_float, check_positive, register


def kto_reference_point(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0, an estimate of KL(pi(y'|x) || pi_ref(y'|x)) from MISMATCHED pairs
    (prompt x_i with another example's completion y'_j, e.g. completions rotated by one within the
    batch, as TRL builds them):

        z0 = max(0, mean_j [ log pi(y'_j|x_j) - log pi_ref(y'_j|x_j) ])     (detached)

    Summed log-probs. Detached: the paper does not backpropagate through z0. The KL is clamped at 0
    because the true KL is non-negative and the estimate is noisy. (Under data parallelism TRL
    averages this over all ranks before clamping; here it is the local batch.)"""
    if policy_kl_logps.shape != reference_kl_logps.shape:
        raise ValueError(f"KL log-prob shapes differ: {tuple(policy_kl_logps.shape)} vs "
                         f"{tuple(reference_kl_logps.shape)}")
    kl = (as_float(policy_kl_logps) - as_float(reference_kl_logps)).mean().detach()
    return kl.clamp(min=0)


@register("kto", needs_reference=True, average_logps=False, batch="unpaired",
          paper="https://arxiv.org/abs/2402.01306")
def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLoss:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306):

        r(x, y) = log pi(y|x) - log pi_ref(y|x)                   (summed log-probs)
        z0      = max(0, mean over mismatched pairs of r(x, y'))  (detached; kto_reference_point)
        v(x, y) = lambda_D sigma(beta (r - z0))   if y is desirable
                  lambda_U sigma(beta (z0 - r))   if y is undesirable
        L       = mean_batch[ lambda_y - v(x, y) ]
                = mean_batch[ lambda_D (1 - sigma(beta (r - z0))) | lambda_U (1 - sigma(beta (z0 - r))) ]

    ``desirable``: bool ``[batch]``, True for a desirable (thumbs-up) completion. The mean runs over
    the whole batch, desirable and undesirable examples together. lambda_D = ``desirable_weight``,
    lambda_U = ``undesirable_weight``; with unequal class counts n_D, n_U the paper recommends
    lambda_D n_D / (lambda_U n_U) in [1, 4/3].

    Matches TRL 1.16 ``KTOTrainer._compute_loss`` with ``loss_type="kto"`` and ``calculate_KL=True``
    (TRL 1.16 has no separate ``kto_loss`` method; the loss is inline there):
    ``nanmean(cat(lambda_D * chosen_losses, lambda_U * rejected_losses))``. Rewards are TRL's
    ``beta * r`` for the desirable (``chosen_rewards``) and undesirable (``rejected_rewards``)
    examples, detached; ``metrics["kl"]`` is z0.

    On the seed survey (no formula given): it says KTO weights losses more heavily than gains. In
    the loss that loss aversion is only the ratio lambda_U / lambda_D, a hyperparameter (TRL's
    defaults are 1 and 1, i.e. no aversion), and the value function is a sigmoid around the
    reference point z0, not Kahneman-Tversky's original power-law value function.
    """
    if policy_logps.dim() != 1 or desirable.shape != policy_logps.shape or reference_logps.shape != policy_logps.shape:
        raise ValueError(f"policy_logps, reference_logps and desirable must all have shape [batch]; got "
                         f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(desirable.shape)}")
    check_positive(beta=beta)
    desirable = desirable.to(torch.bool)
    z0 = kto_reference_point(policy_kl_logps, reference_kl_logps)
    logratios = as_float(policy_logps) - as_float(reference_logps)
    chosen_logratios, rejected_logratios = logratios[desirable], logratios[~desirable]
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - z0))
    rejected_losses = 1 - torch.sigmoid(beta * (z0 - rejected_logratios))
    loss = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses)).mean()
    return PreferenceLoss(loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), {"kl": z0})
