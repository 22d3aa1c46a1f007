"""On-policy RL with verifiable rewards: sample a group per prompt, score, update (GRPO / DAPO).

One loop step = for each prompt of the micro batch, ``group_size`` sampled completions, their
rewards (a weighted sum of reward functions), group-relative advantages, then one clipped policy
gradient step on the completion tokens (losses in :mod:`tunegraph.training.objectives.grpo`).
The reference policy for the KL term is the initial policy: the base model with the LoRA adapter switched
off (no second copy), the initial prompt encoder under prompt-style adapters; under full fine-tuning a
frozen copy is kept, only when ``beta > 0`` (:func:`make_reference`).
With ``kernels: true`` the policy loss and the reference log-probs come from the LM head's input without
materializing the logits (:func:`fused_policy_loss`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from tunegraph.training import fused_head
from tunegraph.training.chat_encoding import IGNORE_INDEX, prompt_ids
from tunegraph.training.loop import StepOutput
from tunegraph.training.objectives.grpo import (clipped_policy_loss, group_advantages, informative_groups,
                                                overlong_penalty)
from tunegraph.training.objectives.logps import token_logps

RewardFn = Callable[[str, dict], float]


@dataclass(frozen=True)
class RolloutSettings:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class PolicySettings:
    beta: float
    eps_low: float
    eps_high: float
    aggregation: str  # "sequence" (GRPO) or "token" (DAPO)
    scale_advantages: bool
    dynamic_sampling: bool
    overlong_cache: int | None


@dataclass(frozen=True)
class Rollout:
    sequences: torch.Tensor  # [B*G, P+C] left-padded prompt + completion
    attention_mask: torch.Tensor  # [B*G, P+C]
    labels: torch.Tensor  # completion tokens (up to and including EOS), -100 elsewhere
    texts: list[str]
    lengths: torch.Tensor  # completion tokens per sample
    prompt_width: int = 0  # columns of (left-padded) prompt before the completion starts


@torch.no_grad()
def sample_groups(model, tokenizer, conversations: list[list[dict]], settings: RolloutSettings) -> Rollout:
    """``group_size`` sampled completions per conversation (seeded by the global torch RNG)."""
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations for _ in range(settings.group_size)]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    was_training = model.training
    model.eval()
    output = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=settings.temperature,
                            top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
                            eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    completion = output[:, width:]
    is_eos = completion == tokenizer.eos_token_id
    # keep tokens up to and including the first EOS; generate pads finished rows after it
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    labels = torch.full_like(output, IGNORE_INDEX)
    labels[:, width:] = completion.masked_fill(after_eos, IGNORE_INDEX)
    texts = tokenizer.batch_decode(completion.masked_fill(after_eos, pad), skip_special_tokens=True)
    return Rollout(output, torch.cat([mask, completion_mask], dim=1), labels, texts, completion_mask.sum(-1), width)


def _position_ids(rollout: Rollout) -> torch.Tensor:
    # skip the left padding, as generation saw the prompt
    return (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)


def completion_logps(model, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens [B, T-1] and their mask, with position ids that
    skip the left padding (as generation saw them)."""
    positions = _position_ids(rollout)
    logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=positions).logits
    return token_logps(logits, rollout.labels)


def fused_policy_loss(model, rollout: Rollout, kept_rows: torch.Tensor, advantages: torch.Tensor,
                      policy: PolicySettings, reference) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``kernels: true``: the clipped policy loss (and the reference log-probs) from the LM head's input,
    without the ``[B, T, V]`` logits (:mod:`tunegraph.kernels.fused_linear_policy_loss`); the same
    ``(loss, metrics)`` as :func:`clipped_policy_loss` over :func:`completion_logps`, plus the token mask.
    Rows of dropped groups get no labels, so they cost no logits and add nothing, as a zeroed mask does."""
    from tunegraph.kernels.fused_linear_policy_loss import fused_linear_policy_loss

    labels = rollout.labels.masked_fill(~kept_rows.unsqueeze(1), IGNORE_INDEX)
    positions = _position_ids(rollout)
    head = fused_head.lm_head(model)
    hidden = fused_head.final_hidden_states(model, rollout.sequences, rollout.attention_mask, positions)
    ref_logps = None
    if reference is not None:  # after the policy's forward, as the logits path (same RNG draws under NEFTune)
        ref_model, context = reference()
        with torch.no_grad(), context:
            ref_logps = fused_head.token_logps(ref_model, rollout.sequences, rollout.attention_mask, labels, positions)
    loss, metrics = fused_linear_policy_loss(hidden, head.weight, labels, advantages, bias=head.bias,
                                             ref_logps=ref_logps, eps_low=policy.eps_low, eps_high=policy.eps_high,
                                             beta=policy.beta, aggregation=policy.aggregation)
    return loss, metrics, labels[:, 1:] != IGNORE_INDEX


def make_reference(model, beta: float):
    """A context manager factory that makes ``model`` compute reference log-probs, or None if beta = 0.

    The reference is the initial policy pi_0 (call this before any update). LoRA, DoRA, QLoRA and IA3
    start as the identity (B = 0, l = 1), so pi_0 is the policy with its adapter switched off: no copy.
    Prompt-style adapters do not: their virtual tokens (sampled vocabulary embeddings, or a prompt
    encoder's output) already change the output, and switching them off gives the base model WITHOUT a
    prompt, so KL(pi || pi_ref) would be > 0 before the first update and pull toward a model that was never
    the policy. Their reference swaps in a frozen copy of the initial prompt encoder (virtual tokens only,
    no second model). Full fine-tuning keeps one frozen copy of the model."""
    if not beta:
        return None
    if _is_prompt_learning(model):
        return _initial_prompt_reference(model)
    if hasattr(model, "disable_adapter"):
        return lambda: (model, model.disable_adapter())
    frozen = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: one frozen copy
    return lambda: (frozen, nullcontext())


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return bool(getattr(config, "is_prompt_learning", False))


def _initial_prompt_reference(model):
    """The policy with its trained prompt encoder replaced, for the block, by a frozen copy of the initial one."""
    name = model.active_adapter
    initial = copy.deepcopy(model.prompt_encoder[name]).eval().requires_grad_(False)

    @contextmanager
    def initial_prompt():
        trained = model.prompt_encoder[name]
        model.prompt_encoder[name] = initial
        try:
            yield
        finally:
            model.prompt_encoder[name] = trained

    return lambda: (model, initial_prompt())


def make_grpo_step(rows: list[dict], tokenizer, rewards: list[tuple[RewardFn, float]], rollout_settings: RolloutSettings,
                   policy: PolicySettings, reference, fused: bool = False) -> Callable:
    """``fused``: the policy loss from the LM head's input, without the logits (``kernels: true``)."""
    group = rollout_settings.group_size

    def score(texts: list[str], batch_rows: list[dict]) -> torch.Tensor:
        values = []
        for index, text in enumerate(texts):
            row = batch_rows[index // group]
            values.append(sum(weight * float(fn(text, row)) for fn, weight in rewards))
        return torch.tensor(values)

    def step(model, indices: list[int]) -> StepOutput:
        batch_rows = [rows[i] for i in indices]
        rollout = sample_groups(model, tokenizer, [row["messages"][:-1] for row in batch_rows], rollout_settings)
        raw = score(rollout.texts, batch_rows)
        shaped = raw
        if policy.overlong_cache:
            shaped = raw + overlong_penalty(rollout.lengths, rollout_settings.max_new_tokens, policy.overlong_cache)
        advantages = group_advantages(shaped, group, scale=policy.scale_advantages)
        keep = torch.ones(len(indices), dtype=torch.bool)
        if policy.dynamic_sampling:
            keep = informative_groups(shaped, group)
        if fused:
            loss, extra, mask = fused_policy_loss(model, rollout, keep.repeat_interleave(group), advantages, policy,
                                                  reference)
        else:
            logps, mask = completion_logps(model, rollout)
            mask = mask & keep.repeat_interleave(group).unsqueeze(1)
            ref_logps = None
            if reference is not None:
                ref_model, context = reference()
                with torch.no_grad(), context:
                    ref_logps, _ = completion_logps(ref_model, rollout)
            loss, extra = clipped_policy_loss(logps, logps.detach(), advantages, mask, eps_low=policy.eps_low,
                                              eps_high=policy.eps_high, beta=policy.beta, ref_logps=ref_logps,
                                              aggregation=policy.aggregation)
        metrics = {"reward": float(raw.mean()), "reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
                   "kept_groups": float(keep.float().mean()), "completion_tokens": float(rollout.lengths.float().mean()),
                   **{k: float(v) for k, v in extra.items()}}
        return StepOutput(loss, int(mask.sum()), metrics)

    return step
