"""A small, deterministic training loop: seeded batch order, AdamW, warmup + linear decay.

The objective comes in as a step function ``step_fn(model, indices) -> StepOutput``: it builds the
micro batch for those example indices and returns its differentiable loss, its token count and
scalar metrics. Update strategies only decide which parameters have ``requires_grad``. Gradient
accumulation over ``grad_accum`` micro batches, global-norm clipping, per-step metrics (loss, lr,
tokens/s and the objective's own) through the stage context.

Under a multi-process launch (torchrun; see :mod:`tunegraph.distributed`) each rank computes its slice
of every micro batch and the gradients are averaged across ranks before clipping: data parallelism
with the same batch schedule, seed and effective batch size as a single process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tunegraph import distributed
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.training.checkpoint import Checkpointer, LoopState, run_fingerprint
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
    checkpoint_every: int | None = None  # optimizer steps between checkpoints; None: no checkpoints
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    first_loss: float
    final_loss: float  # mean over the last 10 % of steps
    tokens: int
    seconds: float
    final_metrics: dict[str, float]  # the objective's metrics, mean over the last 10 % of steps


StepFn = Callable[[torch.nn.Module, list[int]], StepOutput]


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


def _tail_mean(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail) if tail else float("nan")


def train(model, n_examples: int, step_fn: StepFn, settings: LoopSettings, ctx: StageContext,
          checkpoint_dir: Path | None = None,
          make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None) -> TrainSummary:
    """With ``settings.checkpoint_every`` and a checkpoint dir (argument, else ``ctx.checkpoint_dir``): resume
    from this run's newest checkpoint there, and save one every that many steps (bit-identical result)."""
    from transformers import get_linear_schedule_with_warmup

    schedule = micro_batches(n_examples, settings, ctx.seed)
    steps = math.ceil(len(schedule) / settings.grad_accum)
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
        schedule = schedule[: steps * settings.grad_accum]
    trainable = [p for p in model.parameters() if p.requires_grad]
    world = distributed.current_world()
    if world.size > settings.batch_size:
        raise StageError(f"stage {ctx.stage!r}: batch_size={settings.batch_size} is smaller than the {world.size} "
                         f"processes; raise batch_size so each process gets at least one example per micro batch")
    distributed.broadcast_trainable(model)
    # the update strategy may bring its own optimizer (GaLore); else AdamW over the trainable parameters
    optimizer = (make_optimizer(model) if make_optimizer is not None else
                 torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    model.train()
    checkpoint_dir = checkpoint_dir or ctx.checkpoint_dir
    checkpoints = None
    if settings.checkpoint_every and checkpoint_dir is not None:
        checkpoints = Checkpointer(checkpoint_dir, settings.checkpoint_every, settings.keep_checkpoints,
                                   run_fingerprint(model, optimizer, settings, n_examples, ctx.seed, ctx.threads))
    state = (checkpoints.resume(model, optimizer, scheduler) if checkpoints else None) or LoopState()
    if state.step:
        ctx.info(f"resuming from step {state.step}")
    losses, history, tokens, started = state.losses, state.history, state.tokens, time.monotonic()
    for step in range(state.step, steps):
        step_started, step_loss, step_tokens = time.monotonic(), 0.0, 0
        step_metrics: dict[str, float] = {}
        micro = schedule[step * settings.grad_accum:(step + 1) * settings.grad_accum]
        worked = False
        for indices in micro:
            mine = distributed.shard(indices, world)
            if not mine:  # a short last batch can leave a rank empty; it still joins the all-reduce
                continue
            worked = True
            output = step_fn(model, mine)
            (output.loss / len(micro)).backward()
            step_loss += output.loss.item() / len(micro)
            step_tokens += output.tokens
            for key, value in output.metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / len(micro)
        if world.distributed:
            distributed.average_gradients(trainable)
            step_loss, step_tokens, step_metrics = distributed.combine_step_logs(step_loss, step_tokens,
                                                                                 step_metrics, worked)
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        for key, value in step_metrics.items():
            history.setdefault(key, []).append(value)
        tokens += step_tokens
        elapsed = time.monotonic() - step_started
        if world.is_main:
            ctx.log_step(step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                "tokens_per_s": step_tokens / max(elapsed, 1e-9), **step_metrics})
            ctx.progress(step + 1, steps, f"loss {step_loss:.4f}")
        if checkpoints and world.is_main:
            checkpoints.after_step(model, optimizer, scheduler, LoopState(step + 1, losses, history, tokens))
    return TrainSummary(steps, losses[0] if losses else float("nan"), _tail_mean(losses), tokens,
                        time.monotonic() - started, {k: _tail_mean(v) for k, v in history.items()})
