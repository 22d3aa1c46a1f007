"""CPO: DPO without a reference model, plus behaviour cloning on the chosen responses."""

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


@register("cpo", needs_reference=False, average_logps=False, batch="pairs", needs_chosen_nll=True,
          paper="https://arxiv.org/abs/2401.08417")
def cpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor, *,
             beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> PreferenceLoss:
    """Contrastive Preference Optimization (Xu et al. 2024, https://arxiv.org/abs/2401.08417):

        L_prefer = mean_batch[ -log sigma(beta log pi(y_w|x) - beta log pi(y_l|x)) ]
        L_NLL    = - log pi(y_w|x)                      (behaviour cloning on the chosen responses)
        L        = L_prefer + alpha * L_NLL

    with SUMMED log-probs. L_prefer is the DPO loss with a uniform reference model (the paper's
    upper bound on DPO that drops pi_ref); L_NLL keeps pi close to the preferred-data distribution.
    The paper weights the two terms equally (alpha = 1, TRL's ``cpo_alpha`` default).

    ``chosen_nll`` is the behaviour-cloning term as computed by the caller: a scalar, or per-sequence
    values that are averaged. TRL uses ``CrossEntropyLoss`` over the chosen tokens, the token-level
    mean over the batch; :func:`tunegraph.training.objectives.logps.token_mean_nll` computes exactly
    that from ``sequence_logps(..., average=False)``. ``label_smoothing`` eps gives TRL's conservative
    ``-(1-eps) log sigma(z) - eps log sigma(-z)``; eps = 0 is the paper's loss.

    Matches TRL 1.16 ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="sigmoid"``,
    ``alpha=0`` (no AlphaPO), combined as in ``CPOTrainer.get_batch_loss_metrics``:
    ``losses.mean() + cpo_alpha * nll``. Rewards are TRL's ``beta * log pi(y|x)``, detached.

    On the seed survey: its method table calls CPO a "contrastive regularizer via KL to preferred
    data distribution". Loose but not wrong: the paper motivates the regularizer as a constraint
    on KL(pi_w || pi) with pi_w the preferred-data distribution, which up to pi_w's (constant)
    entropy IS the chosen NLL above; what is implemented is that NLL, not an explicit KL, and the
    "contrastive" part is the reference-free DPO-style sigmoid loss. The survey gives no formula.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps)
    check_positive(beta=beta)
    check_label_smoothing(label_smoothing)
    chosen_logps, rejected_logps = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    losses = smoothed_sigmoid_loss(beta * (chosen_logps - rejected_logps), label_smoothing)
    loss = losses.mean() + alpha * as_float(chosen_nll).mean()
    return PreferenceLoss(loss, beta * chosen_logps.detach(), beta * rejected_logps.detach())
