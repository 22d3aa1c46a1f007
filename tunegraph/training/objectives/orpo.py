"""ORPO: supervised fine-tuning plus an odds-ratio preference penalty, no reference model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunegraph.training.objectives.base import PreferenceLoss, as_float, check_pair, check_positive, register

_MINUS_LOG_2 = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable at both ends (Maechler 2012): ``log(-expm1(x))`` near 0,
    ``log1p(-exp(x))`` below -log 2. The same branch as TRL's ``trl.experimental.orpo.log1mexp``."""
    return torch.where(x < _MINUS_LOG_2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("orpo", needs_reference=False, average_logps=True, batch="pairs", needs_chosen_nll=True,
          paper="https://arxiv.org/abs/2403.07691")
def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor, *,
              lam: float = 0.1) -> PreferenceLoss:
    """Odds Ratio Preference Optimization (Hong, Lee & Thorne 2024, https://arxiv.org/abs/2403.07691):

        P(y|x)      = exp( (1/|y|) sum_t log pi(y_t | x, y_<t) )  (length-normalized likelihood)
        odds(y|x)   = P(y|x) / (1 - P(y|x))
        log_odds    = log odds(y_w|x) - log odds(y_l|x)
                    = (l_w - l_r) - (log(1 - exp(l_w)) - log(1 - exp(l_r)))      l = average log-prob
        L_OR        = -log sigma(log_odds)
        L           = L_SFT + lambda * mean_batch(L_OR)

    The inputs are per-token AVERAGE log-probs (registry ``average_logps=True``), which must be < 0;
    ``chosen_nll`` is L_SFT as computed by the caller (scalar, or per-sequence values that are
    averaged). ``log(1 - exp(l))`` is evaluated with the stable :func:`log1mexp`, as TRL does.

    Matches TRL 1.16 ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`` (whose ``beta`` is lambda)
    combined as in ``ORPOTrainer.get_batch_loss_metrics``: ``nll - mean(beta * logsigmoid(log_odds))``.
    TRL's ``odds_ratio_loss`` returns ``+beta * log sigma(log_odds)`` (a log-likelihood, <= 0) and
    the trainer SUBTRACTS its mean, so the sign conventions agree with the paper. Note TRL computes
    L_SFT over the whole chosen sequence, prompt tokens included (``labels = input_ids`` where
    attended); the paper's L_SFT is the NLL of the chosen response; pass whichever you want as
    ``chosen_nll`` (:func:`tunegraph.training.objectives.logps.token_mean_nll` gives TRL's token mean
    over the labelled tokens). Rewards are TRL's ``lambda * average log pi``, detached; ``metrics``
    holds the batch means of ``log_odds`` and ``log sigma(log_odds)``.

    Corrections to the seed survey, which writes ``L_SFT + lambda * log sigma(log odds ratio)``:
    (1) the sign: the penalty is MINUS log sigma; adding ``+lambda log sigma`` would reward the
    model for preferring the REJECTED response; (2) the odds use the length-normalized likelihood
    (average log-prob), not the raw sequence probability p(y|x), which for long responses is ~0 and
    makes the odds ratio degenerate to the plain likelihood ratio.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps)
    check_positive(lam=lam)
    chosen_logps, rejected_logps = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    log_sigmoid = F.logsigmoid(log_odds)
    loss = as_float(chosen_nll).mean() - lam * log_sigmoid.mean()
    return PreferenceLoss(loss, lam * chosen_logps.detach(), lam * rejected_logps.detach(),
                          {"log_odds": log_odds.detach().mean(), "log_sigmoid_log_odds": log_sigmoid.detach().mean()})
