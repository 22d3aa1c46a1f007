"""A small, deterministic training loop: seeded batch order, AdamW, warmup + linear decay.

The objective is a function ``loss_fn(model, batch) -> scalar tensor``; update strategies only
decide which parameters have ``requires_grad``. Gradient accumulation over ``grad_accum`` micro
batches, global-norm clipping, per-step metrics (loss, lr, tokens/s) through the stage context.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from tunegraph.context import StageContext
from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample


@dataclass(frozen=True)
class LoopSettings:
    epochs: float
    batch_size: int
    grad_accum: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    max_steps: int | None


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    first_loss: float
    final_loss: float  # mean over the last 10 % of steps
    tokens: int
    seconds: float


def collate(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (the model shifts labels itself)."""
    return model(**batch).loss


def micro_batches(n_examples: int, settings: LoopSettings, seed: int) -> list[list[int]]:
    """Index lists for every micro batch of the run, shuffled per epoch by a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n_examples / settings.batch_size)
    total = math.ceil(per_epoch * settings.epochs)
    batches: list[list[int]] = []
    while len(batches) < total:
        order = torch.randperm(n_examples, generator=generator).tolist()
        batches += [order[i:i + settings.batch_size] for i in range(0, n_examples, settings.batch_size)]
    return batches[:total]


def train(model, examples: list[EncodedExample], settings: LoopSettings, ctx: StageContext, pad_id: int,
          loss_fn: Callable = causal_lm_loss) -> TrainSummary:
    from transformers import get_linear_schedule_with_warmup

    schedule = micro_batches(len(examples), settings, ctx.seed)
    steps = math.ceil(len(schedule) / settings.grad_accum)
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
        schedule = schedule[: steps * settings.grad_accum]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    model.train()
    losses: list[float] = []
    tokens, started = 0, time.monotonic()
    for step in range(steps):
        step_started, step_loss, step_tokens = time.monotonic(), 0.0, 0
        for indices in schedule[step * settings.grad_accum:(step + 1) * settings.grad_accum]:
            batch = collate([examples[i] for i in indices], pad_id)
            loss = loss_fn(model, batch) / settings.grad_accum
            loss.backward()
            step_loss += loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens += step_tokens
        elapsed = time.monotonic() - step_started
        ctx.log_step(step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": step_tokens / max(elapsed, 1e-9)})
        ctx.progress(step + 1, steps, f"loss {step_loss:.4f}")
    tail = losses[-max(1, len(losses) // 10):]
    return TrainSummary(steps, losses[0] if losses else float("nan"), sum(tail) / len(tail), tokens,
                        time.monotonic() - started)
