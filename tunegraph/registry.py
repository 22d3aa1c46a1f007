"""The stage registry: a stage kind is one function in ``tunegraph.tasks`` under ``@stage(...)``.

A stage function has the signature ``fn(params, inputs, out, ctx) -> StageResult``:

- ``params``: the kind's pydantic params model, already validated;
- ``inputs``: upstream artifact directories by slot name (read-only). A slot declared with
  ``many=True`` (YAML ``inputs: {models: [sft, grpo]}``) maps to a dict ``{upstream stage: directory}``
  in the order the recipe lists them; every other slot maps to one directory;
- ``out``: an empty directory the stage writes into (the runner renames it into place);
- ``ctx``: seed, thread count, step-metric logging and progress (see :mod:`tunegraph.context`).

It is a plain function: tests call it without Prefect, MLflow or DVC.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from pydantic import BaseModel

from tunegraph.errors import RecipeError, StageError
from tunegraph.suggest import did_you_mean

# What a stage's output directory holds; input slots name the types they accept.
ARTIFACT_TYPES = ("model", "dataset", "eval")


@dataclass(frozen=True)
class InputSlot:
    """A named input of a stage kind and the artifact types it accepts.

    ``many``: the slot takes a list of upstream stages (at least one), e.g. the models of a merge.
    """

    name: str
    accepts: tuple[str, ...]
    optional: bool = False
    many: bool = False


# Upstream stage names by slot, as the recipe lists them: one name, or a tuple for a ``many`` slot.
UpstreamNames = Mapping[str, str | Sequence[str]]


class InputsMismatch(StageError):
    """A stage's params do not fit the inputs its recipe entry lists (raised by a kind's ``check_inputs``).

    ``location`` is the key path inside the stage's recipe entry, e.g. ``("params", "models", "sft")``
    or ``("inputs", "base")``, so recipe validation can name the file line.
    """

    def __init__(self, message: str, location: tuple = ()):
        super().__init__(message)
        self.location = tuple(location)


def upstream_names(inputs: Mapping[str, object]) -> dict[str, str | tuple[str, ...]]:
    """The upstream stage names of a stage function's ``inputs`` (for ``check_inputs`` at run time):
    a ``many`` slot's dict gives its keys, a directory gives its name (artifacts live at ``.../<stage>``)."""
    return {slot: tuple(value) if isinstance(value, Mapping) else getattr(value, "name", str(value))
            for slot, value in inputs.items()}


@dataclass(frozen=True)
class StageResult:
    """What a stage returns.

    ``metrics`` must be deterministic (accuracy, loss...): they go to MLflow and to the
    DVC-tracked metrics file. ``timings`` (seconds, tokens/s...) vary run to run: MLflow only.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StageKind:
    name: str
    fn: Callable
    params_model: type[BaseModel]
    inputs: tuple[InputSlot, ...]
    produces: str
    summary_metrics: tuple[str, ...]
    # (params, upstream names by slot) -> None; raises InputsMismatch when params name inputs the recipe
    # does not list (e.g. per-model merge weights keyed by stage name). Run by recipe validation.
    check_inputs: Callable[[BaseModel, UpstreamNames], None] | None = None

    @property
    def module(self) -> str:
        return self.fn.__module__

    def slot(self, name: str) -> InputSlot | None:
        return next((s for s in self.inputs if s.name == name), None)


_REGISTRY: dict[str, StageKind] = {}
_DISCOVERED = False


def stage(
    name: str,
    *,
    params: type[BaseModel],
    produces: str,
    inputs: tuple[InputSlot, ...] = (),
    summary_metrics: tuple[str, ...] = (),
    check_inputs: Callable[[BaseModel, UpstreamNames], None] | None = None,
) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the stage kind ``name``. ``summary_metrics`` appear in the run table;
    ``check_inputs`` cross-checks params against the listed upstream stages (see :class:`StageKind`)."""
    if produces not in ARTIFACT_TYPES:
        raise ValueError(f"stage {name!r}: produces must be one of {ARTIFACT_TYPES}")

    def register(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"stage kind {name!r} registered twice")
        _REGISTRY[name] = StageKind(name, fn, params, tuple(inputs), produces, tuple(summary_metrics),
                                    check_inputs)
        return fn

    return register


def _discover() -> None:
    """Import every module of ``tunegraph.tasks`` once, so their decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("tunegraph.tasks")
    for info in pkgutil.iter_modules(package.__path__, prefix="tunegraph.tasks."):
        importlib.import_module(info.name)
    _DISCOVERED = True


def all_kinds() -> dict[str, StageKind]:
    _discover()
    return dict(_REGISTRY)


def get_kind(name: str, where: str = "") -> StageKind:
    kinds = all_kinds()
    if name not in kinds:
        prefix = f"{where}: " if where else ""
        raise RecipeError(
            f"{prefix}unknown stage kind {name!r}{did_you_mean(name, kinds)}; "
            f"known kinds: {', '.join(sorted(kinds))}"
        )
    return kinds[name]
