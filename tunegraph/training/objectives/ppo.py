"""PPO-RLHF pieces: per-token KL reward shaping, GAE, whitening, the clipped policy and value losses.

PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) as RLHF uses it (Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593; Stiennon et al. 2020; Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155), with the details of Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO" (https://arxiv.org/abs/2403.17031). Every tensor is ``[batch, completion
tokens]`` with ``mask`` 1 on a completion's tokens (up to and including its EOS), 0 after:

- each completion token y_t is an action; the episode ends at the completion's last token T;
- per-token reward: a KL penalty to the reference policy on every token, the sequence score on the last

      r_t = -beta * KL_t + [t = T] * score,      KL_t = log pi(y_t | s_t) - log pi_ref(y_t | s_t)   (k1)

  (``k3`` is Schulman's exp(-k1) + k1 - 1 >= 0 estimator instead);
- GAE(gamma, lambda) on the value estimates V(s_t), with V(s_{T+1}) = 0 (the episode ends):

      delta_t = r_t + gamma V(s_{t+1}) - V(s_t),     A_t = delta_t + gamma lambda A_{t+1},   R_t = A_t + V(s_t)

  then A is whitened over the batch's tokens (mean 0, variance 1), as TRL always did;
- the clipped surrogate, with rho_t = pi_theta(y_t | s_t) / pi_old(y_t | s_t):

      L_pi = mean_tokens[ max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) ]

- the clipped value loss around the rollout's values V_old:

      L_V  = 1/2 mean_tokens[ max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]
      L    = L_pi + c_v L_V                                           (c_v = ``vf_coef``)

"mean_tokens" is the mean over the mask (TRL's ``masked_mean``). TRL 1.16 no longer ships a PPO
trainer (PPOTrainer left TRL with 0.x; ``trl.experimental`` has none either), so these are checked
against hand-computed values in ``tests/test_ppo.py``; the formulas are the ones TRL 0.x's
``PPOTrainer`` (the "PPOv2" rewrite following Huang et al.) implemented, including unbiased
whitening with eps 1e-8.
"""

from __future__ import annotations

from typing import Literal

import torch

from tunegraph.training.objectives.grpo import k3_kl

KLEstimator = Literal["k1", "k3"]
WHITEN_EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 if the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, var unbiased (n - 1); ``shift_mean=False``
    keeps the mean and only rescales (reward whitening). Entries outside the mask are returned as 0."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    n = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask) * (n / (n - 1).clamp(min=1))
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """KL(pi || pi_ref) estimate per sampled token: k1 = log pi - log pi_ref (unbiased, any sign), or
    k3 = exp(-k1) + k1 - 1 (unbiased, >= 0; :func:`tunegraph.training.objectives.grpo.k3_kl`)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last completion token (the mask is a prefix of ones)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta KL_t on every completion token, plus the sequence score on its last token; 0 after."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438):
    ``(advantages, returns)``, both 0 after each completion's last token. V is taken as 0 after the
    last token, so delta_T = r_T - V(s_T)."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate L_pi (token mean) and detached metrics: ``clipfrac`` (share of tokens where
    the clipped branch is the larger loss) and ``approx_kl`` = mean (1/2)(log rho)^2 (old -> new policy)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
               "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask)}
    return loss, metrics


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_V = 1/2 token-mean of max((V - R)^2, (V_clipped - R)^2) and ``value_clipfrac``."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, {"value_clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()}
