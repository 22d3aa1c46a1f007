"""Train a toy linear regression with tunegraph's loop; launched once plainly and once by torchrun.

Writes the final weights to ``<out>/weights-rank<r>.pt``. The loss is a mean over the micro batch and
every rank gets an equal slice, so averaged gradients equal the single-process gradient: the final
weights must agree with the single-process run to float rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tunegraph.context import StageContext, seed_everything
from tunegraph.distributed import init_process_group
from tunegraph.training.loop import LoopSettings, StepOutput, train


def main(out: Path) -> None:
    world = init_process_group()
    seed_everything(3, 1)
    inputs = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    targets = inputs @ torch.arange(1.0, 6.0) + 0.5
    model = torch.nn.Linear(5, 1)
    if world.rank == 1:  # a different start on rank 1: the loop must broadcast rank 0's weights
        torch.nn.init.constant_(model.weight, 7.0)

    def step(model, indices: list[int]) -> StepOutput:
        prediction = model(inputs[indices]).squeeze(-1)
        return StepOutput(torch.mean((prediction - targets[indices]) ** 2), len(indices))

    settings = LoopSettings(epochs=2, batch_size=8, grad_accum=1, learning_rate=0.05, warmup_ratio=0.0,
                            weight_decay=0.0, max_grad_norm=100.0, max_steps=None)
    ctx = StageContext(stage="ddp", seed=3, threads=1, workspace=out)
    summary = train(model, len(inputs), step, settings, ctx)
    torch.save({"weight": model.weight.detach(), "bias": model.bias.detach(), "loss": summary.final_loss,
                "tokens": summary.tokens}, out / f"weights-rank{world.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
