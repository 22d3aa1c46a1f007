"""GRPO and DAPO policy losses over sampled completions scored by verifiable rewards.

GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300): sample a group of G
completions o_1..o_G per prompt, score them, and use the group-normalized reward as every token's
advantage (no value model):

    A_i      = (r_i - mean_j r_j) / (std_j r_j + eps)
    rho_i,t  = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    l_i,t    = -min(rho_i,t A_i, clip(rho_i,t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_i,t
    KL_i,t   = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1          (Schulman's k3 estimator, >= 0)
    L_GRPO   = (1/G) sum_i (1/|o_i|) sum_t l_i,t                        (sequence-mean, then mean)

DAPO (Yu et al. 2025, https://arxiv.org/abs/2503.14476) changes four things:
- clip-higher: eps_high > eps_low (default 0.28 vs 0.2), so low-probability tokens can grow;
- token-level loss: L = sum_{i,t} l_i,t / sum_i |o_i| (long completions weigh by their length);
- dynamic sampling: groups whose rewards are all equal carry zero advantage and are dropped
  (:func:`informative_groups`);
- overlong reward shaping: a soft penalty in the last ``cache`` tokens before ``max_len``
  (:func:`overlong_penalty`), and no KL term (beta = 0).

With one policy update per generation batch (TRL's ``num_iterations=1``) pi_old is the current
policy detached, so rho = 1 in value while its gradient is the policy gradient. The per-token
formula matches TRL 1.16 ``GRPOTrainer._compute_loss`` (loss_type "grpo" = sequence mean, "bnpo" /
"dapo" = token mean over the batch); the seed survey's GRPO formula omits the clip and the KL
estimator's exact form.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["sequence", "token"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean(group), divided by the group's std (+eps) when ``scale`` (GRPO; Dr. GRPO
    drops the division). ``rewards`` is [n_groups * group_size], groups contiguous."""
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: True for groups whose rewards are not all equal ([n_groups] bool)."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment added to the reward:

        0                                  if |y| <= max_len - cache
        ((max_len - cache) - |y|) / cache  if max_len - cache < |y| <= max_len
        -1                                 if |y| > max_len
    """
    lengths = lengths.float()
    start = max_len - cache
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), (start - lengths) / cache)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                        ref_logps: torch.Tensor | None = None,
                        aggregation: Aggregation = "sequence") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO/DAPO loss from per-token log-probs [B, T] (``mask`` 1 on completion tokens) and
    per-sequence advantages [B]. Returns (loss, detached metrics: clip fraction, mean KL)."""
    if beta and ref_logps is None:
        raise ValueError("beta > 0 needs reference log-probs")
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    adv = advantages.float().unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = k3_kl(logps, ref_logps) if beta else torch.zeros_like(per_token)
    per_token = per_token + beta * kl
    if aggregation == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    tokens = mask.sum().clamp(min=1)
    metrics = {"clip_fraction": (((ratio - clipped).abs() > 0).float() * mask).sum().detach() / tokens,
               "kl": (kl * mask).sum().detach() / tokens}
    return loss, metrics
