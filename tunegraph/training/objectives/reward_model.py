"""The Bradley–Terry loss of a reward model over the scalar scores of preference pairs.

Not in :data:`~tunegraph.training.objectives.OBJECTIVES`: that registry describes objectives over
the policy's log-probs (reference or not, summed or averaged); a reward model's inputs are the
scores of its own score head (:func:`tunegraph.training.reward_model.sequence_scores`). The result
type is the same :class:`~tunegraph.training.objectives.base.PreferenceLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunegraph.training.objectives.base import PreferenceLoss, as_float, check_pair


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                       margin: torch.Tensor | float = 0.0,
                       center_rewards_coefficient: float | None = None) -> PreferenceLoss:
    """Pairwise reward-model loss (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325; Ouyang et al.
    2022, https://arxiv.org/abs/2203.02155, Eq. 1):

        P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l))                  (Bradley–Terry)
        L                = mean_batch[ -log sigma(r(x, y_w) - r(x, y_l) - m) ]
                           + c * mean_batch[ (r(x, y_w) + r(x, y_l))^2 ]

    ``m`` is an optional margin (a float, or one per pair: Llama 2 uses larger margins for clearer
    preferences, https://arxiv.org/abs/2307.09288), 0 is the papers' loss. ``c`` =
    ``center_rewards_coefficient`` adds TRL's centering term (Eisenstein et al. 2023,
    https://arxiv.org/abs/2312.09244): BT fixes scores only up to a constant, the term pins their
    mean near 0. None or 0 leaves it out. (Ouyang et al. compare all K-choose-2 pairs of a prompt in
    one batch; here each row is one pair, as TRL's reward trainer reads them.)

    Matches TRL 1.16 ``RewardTrainer.compute_loss`` on the same scores (checked in
    ``tests/test_reward_model.py``). Rewards are the detached scores; ``metrics`` hold the pairwise
    accuracy (share of pairs with r_w > r_l) and the mean margin r_w - r_l.
    """
    check_pair(chosen_scores, rejected_scores)
    chosen, rejected = as_float(chosen_scores), as_float(rejected_scores)
    margin = torch.as_tensor(margin, dtype=chosen.dtype, device=chosen.device)
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    difference = (chosen - rejected).detach()
    metrics = {"accuracy": (difference > 0).float().mean(), "margin": difference.mean()}
    return PreferenceLoss(loss, chosen.detach(), rejected.detach(), metrics)
