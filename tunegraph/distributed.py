"""Data-parallel training across processes launched by torchrun (or accelerate launch).

A launcher starts N copies of ``tunegraph stage RECIPE NAME`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment. Every rank loads the same
model with the same seed (so the starting weights agree, and rank 0's are broadcast to be sure),
walks the same seeded batch schedule, and takes its own slice ``batch[rank::world]`` of every micro
batch. After the backward passes of an optimizer step the gradients are averaged with one
all-reduce, so every rank applies the same update (plain DDP semantics, without the DDP wrapper:
peft's ``disable_adapter()`` and our reference-model tricks need the bare model). Only rank 0 writes
the artifact, the metrics and the MLflow run.

Backend: ``gloo`` for CPU tensors, ``nccl`` when CUDA is available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The process group a launcher (torchrun, accelerate) set up through the environment; else a world of 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group() -> World:
    """Join the launcher's process group (idempotent); a no-op for a single process."""
    world = launched_world()
    if world.distributed and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def current_world() -> World:
    """The world of an initialized process group (size 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(0, 1, 0)
    return World(dist.get_rank(), dist.get_world_size(), launched_world().local_rank)


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's slice of a micro batch (ranks interleave, so sizes differ by at most one)."""
    return indices[world.rank::world.size] if world.distributed else indices


def broadcast_trainable(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's trainable weights."""
    if current_world().distributed:
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` (one flat buffer: one collective per step)."""
    world = current_world()
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for param, grad in zip(params, grads):
        n = grad.numel()
        param.grad = flat[offset:offset + n].view_as(grad).to(grad.dtype)
        offset += n


def combine_step_logs(loss: float, tokens: int, metrics: dict[str, float],
                      worked: bool) -> tuple[float, int, dict[str, float]]:
    """A step's loss and metrics averaged over the ranks that had examples, tokens summed over all.

    One ``all_gather_object``: ranks may report different metric keys (a rank left without examples
    by a short last batch reports none), which per-key collectives could not survive.
    """
    world = current_world()
    if not world.distributed:
        return loss, tokens, metrics
    reports: list = [None] * world.size
    dist.all_gather_object(reports, (loss, tokens, metrics, worked))
    active = [r for r in reports if r[3]] or reports
    merged: dict[str, list[float]] = {}
    for _, _, rank_metrics, _ in active:
        for key, value in rank_metrics.items():
            merged.setdefault(key, []).append(value)
    return (sum(r[0] for r in active) / len(active), sum(r[1] for r in reports),
            {key: sum(values) / len(values) for key, values in sorted(merged.items())})


def barrier() -> None:
    if current_world().distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
