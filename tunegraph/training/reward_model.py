"""Reward models: scores read at the last attended token, training on preference pairs, the artifact.

A reward model is the decoder with a scalar ``score`` head (:mod:`tunegraph.training.strategies.heads`).
Its reward for a conversation is the head's output at the sequence's last attended token:

    r(x, y) = w^T h_T,        T = the last position whose attention mask is 1

transformers' own pooling takes the last token whose id is not the pad id; with SmolLM2's tokenizer
the pad id IS the EOS (``<|im_end|>``) that ends every reply, and PPO's rollouts are left-padded, so
tunegraph captures the per-token scores from the head and picks T by the attention mask instead.
Training sequences end at the reply's end-of-turn token (what the chat template renders after it,
a newline for ChatML, is dropped), which is where PPO's sampled completions end and are scored.

An artifact is a transformers ``*ForSequenceClassification`` directory (``num_labels=1``) plus
``reward_model.json``, which :func:`load_reward_model` requires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample, encode_chat
from tunegraph.training.loop import StepOutput, collate
from tunegraph.training.objectives.reward_model import bradley_terry_loss
from tunegraph.training.strategies import load_with_adapter
from tunegraph.training.strategies.heads import SCORE_MODULE

REWARD_MODEL_FILE = "reward_model.json"
SCORE_BATCH = 16


def score_module(model) -> torch.nn.Module:
    """The scalar head of a reward model (under peft: its ``modules_to_save`` wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = getattr(base, SCORE_MODULE, None)
    if module is None:
        raise ValueError(f"{type(base).__name__} has no {SCORE_MODULE!r} head; a reward model is a decoder "
                         f"*ForSequenceClassification with num_labels=1")
    return module


def score_weight(model) -> torch.Tensor:
    """The score head's weight ``[1, hidden]`` (under peft: the trained ``modules_to_save`` copy)."""
    module = score_module(model)
    if hasattr(module, "modules_to_save"):
        module = module.modules_to_save[module.active_adapter]
    return module.weight


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last position with mask 1 (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """r(x, y) per row, float32 ``[batch]``: the score head's output at the last attended token."""
    captured: list[torch.Tensor] = []
    handle = score_module(model).register_forward_hook(lambda module, args, output: captured.append(output))
    extra = {"position_ids": position_ids} if position_ids is not None else {}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    finally:
        handle.remove()
    per_token = captured[-1].squeeze(-1)  # [batch, virtual + seq]
    offset = per_token.shape[1] - input_ids.shape[1]  # prompt_tuning / p_tuning put virtual tokens first
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last_attended(attention_mask) + offset].float()


@dataclass(frozen=True)
class PairData:
    chosen: list[EncodedExample]
    rejected: list[EncodedExample]


def end_at_reply(example: EncodedExample, eos_id: int) -> EncodedExample:
    """Cut what the template renders after the reply's final EOS (if that EOS is part of the reply)."""
    ids = example.input_ids
    if example.truncated or eos_id not in ids:
        return example
    last = len(ids) - 1 - ids[::-1].index(eos_id)
    if example.labels[last] == IGNORE_INDEX:  # that EOS ends a prompt turn, not the reply
        return example
    return EncodedExample(ids[:last + 1], example.labels[:last + 1], False)


def encode_pairs(tokenizer, rows: list[dict], max_length: int, ctx: StageContext) -> PairData:
    """prompt + chosen and prompt + rejected, encoded with the chat template, ending at the reply's EOS."""
    missing = next((row for row in rows if "rejected" not in row), None)
    if missing is not None:
        raise StageError(f"stage {ctx.stage!r}: dataset row {missing['id']!r} has no 'rejected'; a reward model "
                         f"needs preference pairs (prompt/chosen/rejected; load_dataset format: preference)")
    eos = tokenizer.eos_token_id

    def encode(messages: list[dict], row_id: str) -> EncodedExample:
        return end_at_reply(encode_chat(tokenizer, messages, max_length, row_id), eos)

    chosen = [encode(row["messages"], row["id"]) for row in rows]
    rejected = [encode(row["messages"][:-1] + [{"role": "assistant", "content": row["rejected"]}], row["id"])
                for row in rows]
    return PairData(chosen, rejected)


def make_reward_step(data: PairData, pad_id: int, margin: float, center_rewards_coefficient: float | None):
    """The loop's step function: score chosen and rejected in one forward, then the Bradley–Terry loss."""

    def step(model, indices: list[int]) -> StepOutput:
        n = len(indices)
        batch = collate([data.chosen[i] for i in indices] + [data.rejected[i] for i in indices], pad_id)
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        result = bradley_terry_loss(scores[:n], scores[n:], margin=margin,
                                    center_rewards_coefficient=center_rewards_coefficient)
        metrics = {"reward_chosen": float(result.chosen_rewards.mean()),
                   "reward_rejected": float(result.rejected_rewards.mean()),
                   "reward_margin": float(result.metrics["margin"]),
                   "reward_accuracy": float(result.metrics["accuracy"])}
        return StepOutput(result.loss, int(batch["attention_mask"].sum()), metrics)

    return step


@torch.no_grad()
def pairwise_metrics(model, data: PairData, pad_id: int) -> dict[str, float]:
    """Share of pairs scored r(chosen) > r(rejected), and the mean margin, in eval mode."""
    was_training = model.training
    model.eval()
    differences = []
    for start in range(0, len(data.chosen), SCORE_BATCH):
        chosen, rejected = data.chosen[start:start + SCORE_BATCH], data.rejected[start:start + SCORE_BATCH]
        batch = collate(chosen + rejected, pad_id)
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        differences.append(scores[:len(chosen)] - scores[len(chosen):])
    model.train(was_training)
    difference = torch.cat(differences)
    return {"accuracy": float((difference > 0).float().mean()), "margin": float(difference.mean())}


def write_reward_marker(out: Path, margin: float, center_rewards_coefficient: float | None) -> None:
    note = {"head": SCORE_MODULE, "num_labels": 1, "loss": "bradley_terry", "margin": margin,
            "center_rewards_coefficient": center_rewards_coefficient,
            "score_at": "the last attended token (attention mask); training sequences end at the reply's EOS",
            "load_with": "tunegraph.training.reward_model.load_reward_model"}
    (Path(out) / REWARD_MODEL_FILE).write_text(json.dumps(note, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_reward_model(model_dir: Path, stage: str):
    """A frozen reward model in eval mode (with its adapter for prompt-style strategies)."""
    model_dir = Path(model_dir)
    if not (model_dir / REWARD_MODEL_FILE).is_file():
        raise StageError(f"stage {stage!r}: input 'reward_model' ({model_dir}) is not a reward model (no "
                         f"{REWARD_MODEL_FILE}); connect it to a stage that uses: reward_model")
    return load_with_adapter(model_dir, head="score").eval().requires_grad_(False)
