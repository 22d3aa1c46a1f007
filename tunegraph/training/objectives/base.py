"""What every preference objective shares: the result type, a registry, the smoothed sigmoid loss.

An objective is a pure function over per-sequence log-probabilities (tensors of shape ``[batch]``,
as :func:`tunegraph.training.objectives.logps.sequence_logps` returns them) and hyperparameters. It
returns a :class:`PreferenceLoss`: the scalar loss to backpropagate, and detached per-example
"rewards" for logging (what TRL logs as ``rewards/chosen`` and ``rewards/rejected``).

The registry says what a trainer must compute before calling an objective:

- ``needs_reference``: frozen reference-model log-probs are inputs (DPO, IPO, KTO);
- ``average_logps``: the log-probs are per-token averages, ``sequence_logps(..., average=True)``
  (IPO, SimPO, ORPO), otherwise sums over completion tokens;
- ``batch``: ``"pairs"`` (prompt, chosen, rejected) or ``"unpaired"`` (prompt, completion, good/bad
  label; KTO);
- ``needs_chosen_nll``: the chosen responses' NLL is an input (CPO, ORPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F

BatchKind = Literal["pairs", "unpaired"]


@dataclass(frozen=True)
class PreferenceLoss:
    loss: torch.Tensor  # scalar, differentiable
    chosen_rewards: torch.Tensor  # [n_chosen], detached; "chosen" = desirable for KTO
    rejected_rewards: torch.Tensor  # [n_rejected], detached; "rejected" = undesirable for KTO
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, for logging


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., PreferenceLoss]
    needs_reference: bool
    average_logps: bool
    batch: BatchKind
    needs_chosen_nll: bool
    paper: str


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, *, needs_reference: bool, average_logps: bool, batch: BatchKind, paper: str,
             needs_chosen_nll: bool = False):
    """Decorator: record ``fn`` in :data:`OBJECTIVES` under ``name`` with what it needs as input."""

    def decorate(fn: Callable[..., PreferenceLoss]) -> Callable[..., PreferenceLoss]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = Objective(name, fn, needs_reference, average_logps, batch, needs_chosen_nll, paper)
        return fn

    return decorate


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}") from None


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are upcast to float32; float32/float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_pair(chosen: torch.Tensor, rejected: torch.Tensor, *others: torch.Tensor) -> None:
    if chosen.dim() != 1:
        raise ValueError(f"per-sequence log-probs must have shape [batch], got {tuple(chosen.shape)}")
    for other in (rejected, *others):
        if other.shape != chosen.shape:
            raise ValueError(f"log-prob shapes differ: {tuple(chosen.shape)} vs {tuple(other.shape)}")


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-example ``-(1 - eps) log sigma(z) - eps log sigma(-z)``: the Bradley-Terry negative
    log-likelihood of the preference "chosen > rejected" when that label is flipped with
    probability ``eps`` (conservative DPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).
    ``eps = 0`` is the plain ``-log sigma(z)``."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = loss * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return loss
