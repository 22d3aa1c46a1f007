"""PPO-RLHF training: sample, score, shape per-token rewards with a KL penalty, GAE, clipped updates.

One PPO *step* (what ``max_steps`` counts and the LR schedule steps over, as in TRL) is:

1. rollout: one sampled completion for each of ``batch_size`` prompts
   (:func:`tunegraph.training.grpo.sample_groups`, group size 1);
2. score: the reward model's score at the completion's last token, plus weighted verifiable rewards,
   minus ``missing_eos_penalty`` for completions cut off at ``max_new_tokens`` (Huang et al. 2024);
3. with the policy as it now is (pi_old), its value head and the reference policy: per-token
   rewards r_t = -beta KL_t (+ score on the last token), GAE advantages (whitened) and returns
   (the math is in :mod:`tunegraph.training.objectives.ppo`);
4. ``ppo_epochs`` passes over a fresh random split of the rollout into ``num_minibatches``
   minibatches: L = L_pi + vf_coef L_V, one optimizer step per minibatch (gradients accumulated
   over ``grad_accum`` micro batches of it, clipped to ``max_grad_norm``).

The reference policy is the initial one: the base with the adapter switched off (no second copy),
or one frozen copy under full fine-tuning, only when beta > 0
(:func:`tunegraph.training.grpo.make_reference`).

PPO needs its own outer loop rather than :func:`tunegraph.training.loop.train`, whose step function
yields one loss per optimizer step: a PPO step makes several optimizer steps on data it generated
itself. It reuses that loop's seeded prompt schedule, settings, optimizer factory, warmup + linear
LR schedule and checkpoints (one per PPO step; resume is bit-identical).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from tunegraph.context import StageContext
from tunegraph.training.checkpoint import Checkpointer, LoopState, run_fingerprint
from tunegraph.training.grpo import Rollout, RolloutSettings, sample_groups
from tunegraph.training.loop import LoopSettings, TrainSummary, micro_batches
from tunegraph.training.objectives.logps import token_logps
from tunegraph.training.objectives.ppo import (clipped_value_loss, gae, masked_mean, masked_whiten, per_token_kl,
                                               ppo_policy_loss, shaped_rewards)
from tunegraph.training.reward_model import sequence_scores
from tunegraph.training.value_head import PolicyWithValue

RewardFn = Callable[[str, dict], float]
Scorer = Callable[[Rollout, list[dict]], torch.Tensor]


@dataclass(frozen=True)
class PPOSettings:
    kl_coef: float
    kl_estimator: str  # "k1" or "k3"
    cliprange: float
    cliprange_value: float
    vf_coef: float
    gamma: float
    lam: float
    ppo_epochs: int
    num_minibatches: int
    whiten_rewards: bool
    missing_eos_penalty: float | None


@dataclass(frozen=True)
class Experience:
    """One rollout and what the updates need, all ``[batch, completion tokens]`` (detached)."""

    rollout: Rollout
    mask: torch.Tensor  # completion tokens up to and including EOS
    logps: torch.Tensor  # pi_old
    values: torch.Tensor  # V_old
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    metrics: dict[str, float]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation to complete: every message but a final assistant reply (a reference answer)."""
    messages = row["messages"]
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def rollout_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip the left padding, as generation saw them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _rows(rollout: Rollout, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if rows is None:
        return rollout.sequences, rollout.attention_mask, rollout.labels
    return rollout.sequences[rows], rollout.attention_mask[rows], rollout.labels[rows]


def completion_frame(model: PolicyWithValue, rollout: Rollout,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log pi(y_t | s_t), V(s_t), mask)`` for the completion tokens y_t, each ``[batch, C]``.

    Logits and hidden states at position j describe the state before token j + 1, so with the
    completion starting at column P, token t's log-prob and value are read at column P - 1 + t;
    only the last C + 1 positions' logits are computed."""
    sequences, attention_mask, labels = _rows(rollout, rows)
    keep = sequences.shape[1] - rollout.prompt_width + 1
    logits, values = model(sequences, attention_mask, rollout_positions(attention_mask), logits_to_keep=keep)
    logps, mask = token_logps(logits, labels[:, -keep:])
    return logps, values[:, -keep:-1], mask


def reference_frame(reference_model, rollout: Rollout) -> torch.Tensor:
    """log pi_ref(y_t | s_t) ``[batch, C]`` from a causal LM (the policy with its adapter off, or a copy)."""
    keep = rollout.sequences.shape[1] - rollout.prompt_width + 1
    logits = reference_model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                             position_ids=rollout_positions(rollout.attention_mask), logits_to_keep=keep).logits
    return token_logps(logits, rollout.labels[:, -keep:])[0]


def right_padded(sequences: torch.Tensor, attention_mask: torch.Tensor,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attended tokens of each row (prompt + completion through EOS) moved to the left, padding
    after: the layout the reward model was trained on, with no need for position ids (which peft's
    prompt-style adapters ignore)."""
    ids = torch.full_like(sequences, pad_id)
    mask = torch.zeros_like(attention_mask)
    for row in range(sequences.shape[0]):
        kept = sequences[row][attention_mask[row].bool()]
        ids[row, :len(kept)] = kept
        mask[row, :len(kept)] = 1
    width = int(mask.sum(-1).max())
    return ids[:, :width], mask[:, :width]


def make_scorer(reward_model, rewards: list[tuple[RewardFn, float]], pad_id: int) -> Scorer:
    """score(y) = r_RM(x, y) (if a reward model is given) + sum_k w_k f_k(y, row)."""

    @torch.no_grad()
    def score(rollout: Rollout, rows: list[dict]) -> torch.Tensor:
        total = torch.zeros(len(rows))
        if reward_model is not None:
            total += sequence_scores(reward_model, *right_padded(rollout.sequences, rollout.attention_mask, pad_id))
        for fn, weight in rewards:
            total += weight * torch.tensor([float(fn(text, row)) for text, row in zip(rollout.texts, rows)])
        return total

    return score


@torch.no_grad()
def collect_experience(model: PolicyWithValue, tokenizer, rows: list[dict], scorer: Scorer,
                       rollout_settings: RolloutSettings, ppo: PPOSettings, reference) -> Experience:
    """Steps 1-3: sample, score, and compute per-token rewards, advantages and returns."""
    rollout = sample_groups(model.policy, tokenizer, [prompt_messages(row) for row in rows], rollout_settings)
    was_training = model.training
    model.eval()  # pi_old and V_old without dropout or NEFTune noise
    logps, values, mask = completion_frame(model, rollout)
    ref_logps = logps
    if reference is not None:
        ref_model, context = reference()
        with context:
            ref_logps = reference_frame(ref_model, rollout)
    model.train(was_training)

    scores = scorer(rollout, rows)
    completion = rollout.sequences[:, rollout.prompt_width:]
    ended = ((completion == tokenizer.eos_token_id) & mask).any(-1)
    if ppo.missing_eos_penalty:
        scores = scores - ppo.missing_eos_penalty * (~ended).float()
    kl = per_token_kl(logps, ref_logps, ppo.kl_estimator) * mask
    rewards = shaped_rewards(scores, kl, mask, ppo.kl_coef)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    advantages = masked_whiten(advantages, mask)
    metrics = {"reward": float(scores.mean()), "kl": float(kl.sum(-1).mean()),
               "non_score_reward": float((-ppo.kl_coef * kl).sum(-1).mean()),
               "value_mean": float(masked_mean(values, mask)), "eos_fraction": float(ended.float().mean()),
               "completion_tokens": float(mask.sum(-1).float().mean())}
    return Experience(rollout, mask, logps, values * mask, advantages, returns, metrics)


def minibatch_loss(model: PolicyWithValue, experience: Experience, rows: torch.Tensor,
                   ppo: PPOSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_pi + vf_coef L_V on the given rows of the rollout, and detached metrics."""
    logps, values, mask = completion_frame(model, experience.rollout, rows)
    policy_loss, policy_metrics = ppo_policy_loss(logps, experience.logps[rows], experience.advantages[rows], mask,
                                                  ppo.cliprange)
    value_loss, value_metrics = clipped_value_loss(values, experience.values[rows], experience.returns[rows], mask,
                                                   ppo.cliprange_value)
    loss = policy_loss + ppo.vf_coef * value_loss
    metrics = {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
               **{k: float(v) for k, v in {**policy_metrics, **value_metrics}.items()}}
    return loss, metrics


def ppo_update(model: PolicyWithValue, experience: Experience, optimizer, ppo: PPOSettings, grad_accum: int,
               max_grad_norm: float) -> dict[str, float]:
    """Step 4: ``ppo_epochs`` x minibatches of optimizer steps; metrics are means over the minibatches."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    history: dict[str, list[float]] = defaultdict(list)
    n = experience.mask.shape[0]
    for _ in range(ppo.ppo_epochs):
        for minibatch in torch.randperm(n).chunk(ppo.num_minibatches):
            micro = minibatch.chunk(grad_accum)
            for rows in micro:
                loss, metrics = minibatch_loss(model, experience, rows, ppo)
                (loss / len(micro)).backward()
                for key, value in metrics.items():
                    history[key].append(value)
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: sum(values) / len(values) for key, values in history.items()}


def _tail_mean(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail) if tail else float("nan")


def train_ppo(model: PolicyWithValue, rows: list[dict], collect: Callable[[list[dict]], Experience],
              ppo: PPOSettings, settings: LoopSettings, ctx: StageContext, make_optimizer,
              fingerprint_extra: dict, checkpoint_dir: Path | None = None) -> TrainSummary:
    """The outer loop: ``batch_size`` prompts per PPO step from the loop's seeded schedule, warmup +
    linear LR decay over PPO steps, per-step metrics and progress, checkpoints every
    ``settings.checkpoint_every`` PPO steps (resumed from ``checkpoint_dir`` or ``ctx.checkpoint_dir``)."""
    from transformers import get_linear_schedule_with_warmup

    schedule = micro_batches(len(rows), settings, ctx.seed)
    steps = min(len(schedule), settings.max_steps) if settings.max_steps else len(schedule)
    optimizer = make_optimizer(model)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    model.train()
    checkpoint_dir = checkpoint_dir or ctx.checkpoint_dir
    checkpoints = None
    if settings.checkpoint_every and checkpoint_dir is not None:
        extra = json.dumps({"ppo": asdict(ppo), **fingerprint_extra}, sort_keys=True)
        checkpoints = Checkpointer(checkpoint_dir, settings.checkpoint_every, settings.keep_checkpoints,
                                   run_fingerprint(model, optimizer, settings, len(rows), ctx.seed, ctx.threads,
                                                   extra))
    state = (checkpoints.resume(model, optimizer, scheduler) if checkpoints else None) or LoopState()
    if state.step:
        ctx.info(f"resuming from PPO step {state.step}")
    losses, history, tokens, started = state.losses, state.history, state.tokens, time.monotonic()
    for step in range(state.step, steps):
        step_started = time.monotonic()
        experience = collect([rows[i] for i in schedule[step]])
        metrics = {**experience.metrics, **ppo_update(model, experience, optimizer, ppo, settings.grad_accum,
                                                      settings.max_grad_norm)}
        scheduler.step()
        loss = metrics.pop("loss")
        step_tokens = int(experience.rollout.attention_mask.sum())
        losses.append(loss)
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        tokens += step_tokens
        elapsed = time.monotonic() - step_started
        ctx.log_step(step, {"loss": loss, "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": step_tokens / max(elapsed, 1e-9), **metrics})
        ctx.progress(step + 1, steps, f"reward {metrics['reward']:.4f} loss {loss:.4f}")
        if checkpoints:
            checkpoints.after_step(model, optimizer, scheduler, LoopState(step + 1, losses, history, tokens))
    return TrainSummary(steps, losses[0] if losses else math.nan, _tail_mean(losses), tokens,
                        time.monotonic() - started, {k: _tail_mean(v) for k, v in history.items()})
