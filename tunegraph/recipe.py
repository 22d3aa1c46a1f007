"""Recipes: one YAML file naming a base model, a seed and a DAG of stages.

Everything is validated before anything runs: the recipe's own keys, each stage's kind, inputs
and params (against the kind's pydantic model), artifact types along edges, and cycles. Every
error is one line naming file, line, stage and field, with a nearest-key hint.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunegraph.errors import RecipeError
from tunegraph.params import StageParams
from tunegraph.registry import InputsMismatch, StageKind, all_kinds
from tunegraph.suggest import did_you_mean
from tunegraph.yaml_lines import key_lines, line_of

_NAME = r"^[A-Za-z][A-Za-z0-9_\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSpec(_Strict):
    uses: str = Field(description="the stage kind, e.g. sft")
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="input slot -> upstream stage (a list for slots that take many)")
    params: dict[str, Any] = Field(default_factory=dict)
    retries: int = Field(0, ge=0, description="Prefect retries on an unexpected failure")
    retry_delay_s: float = Field(10.0, ge=0)
    processes: int = Field(1, ge=1, description="data-parallel processes (torchrun); training stages only")
    # ``register`` in YAML (pydantic's BaseModel has a ``register`` attribute, so the field is named apart)
    register_as: bool | str | None = Field(
        None, alias="register", description="MLflow model registry: true, false or a registered model name; default: "
                          "export_gguf and quantize_bnb register as <recipe>-<stage>")

    def upstream_stages(self) -> tuple[str, ...]:
        """Every upstream stage this stage reads, once each, in the order the recipe lists them."""
        names: list[str] = []
        for value in self.inputs.values():
            names.extend([value] if isinstance(value, str) else value)
        return tuple(dict.fromkeys(names))


class TrackingSpec(_Strict):
    experiment: str | None = Field(None, description="MLflow experiment; defaults to the recipe name")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite in the workspace"
    )


class SweepSpec(_Strict):
    """A grid of recipe variants run as one sweep (see :mod:`tunegraph.sweep`)."""

    grid: dict[str, list[Any]] = Field(description="key path -> values, e.g. stages.sft.params.learning_rate: [1e-4]")
    metric: str = Field(description="STAGE.METRIC (or stages.STAGE.METRIC) that ranks the points")
    goal: typing.Literal["maximize", "minimize"] = "maximize"


class RecipeSpec(_Strict):
    name: str = Field(pattern=_NAME)
    description: str = ""
    base_model: str = Field(description="embedded:NAME, a local directory or a hub id")
    seed: int = 0
    threads: int = Field(2, ge=1, description="torch threads per stage; fixed so outputs are byte-identical")
    output_dir: str | None = Field(None, description="where stage artifacts land; default data/out/<name>")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    stages: dict[str, StageSpec]
    sweep: SweepSpec | None = Field(None, description="run one variant of the recipe per grid point")


@dataclass(frozen=True)
class Stage:
    """A validated node of the recipe's DAG."""

    name: str
    spec: StageSpec
    kind: StageKind
    params: StageParams


@dataclass(frozen=True)
class Recipe:
    path: Path
    spec: RecipeSpec
    stages: dict[str, Stage]
    order: tuple[str, ...]  # topological, ties broken by position in the file

    @property
    def name(self) -> str:
        return self.spec.name

    def output_root(self, workspace: Path) -> Path:
        return workspace / (self.spec.output_dir or f"data/out/{self.spec.name}")

    def upstream(self, name: str) -> dict[str, str]:
        return dict(self.stages[name].spec.inputs)

    def descendants(self, name: str) -> set[str]:
        found, frontier = set(), [name]
        while frontier:
            current = frontier.pop()
            for other, stage in self.stages.items():
                if current in stage.spec.upstream_stages() and other not in found:
                    found.add(other)
                    frontier.append(other)
        return found

    def ancestors(self, name: str) -> set[str]:
        found, frontier = set(), [name]
        while frontier:
            for parent in self.stages[frontier.pop()].spec.upstream_stages():
                if parent not in found:
                    found.add(parent)
                    frontier.append(parent)
        return found


class _Locator:
    """Formats errors as ``file:line: message`` using the YAML's key positions."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = key_lines(text)

    def error(self, loc: tuple, message: str) -> RecipeError:
        line = line_of(self.lines, tuple(loc))
        where = f"{self.path}:{line}" if line else str(self.path)
        return RecipeError(f"{where}: {message}")


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _nested_model(model: type[BaseModel], key) -> tuple[type[BaseModel] | None, bool]:
    """The params model a key of ``model`` holds, and whether it sits in a dict (``models: {sft: {...}}``)."""
    fields = model.model_fields.items() if isinstance(key, str) else ()
    info = next((i for n, i in fields if key in (n, i.alias)), None)
    annotation = info.annotation if info else None
    in_dict = typing.get_origin(annotation) is dict
    if in_dict:
        annotation = typing.get_args(annotation)[1]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, in_dict
    return None, False


def _pydantic_error(locator: _Locator, err: ValidationError, model: type[BaseModel], base_loc: tuple, what: str):
    """First pydantic error as a one-line RecipeError naming the field and a nearest key."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        parent, parts = model, list(loc[:-1])
        while parts:  # descend nested models (and dicts of them) to find the valid siblings
            nested, in_dict = _nested_model(parent, parts.pop(0))
            if nested is None or (in_dict and not parts):
                break
            if in_dict:
                parts.pop(0)  # the dict key, e.g. a model's stage name
            parent = nested
        hint = did_you_mean(loc[-1], _field_names(parent))
        valid = ", ".join(_field_names(parent))
        return locator.error(base_loc + loc, f"{what}unknown key {field!r}{hint}; valid keys: {valid}")
    if first["type"] == "missing":
        return locator.error(base_loc + loc[:-1], f"{what}missing required key {field!r}")
    return locator.error(base_loc + loc, f"{what}field {field!r}: {first['msg']} (got {first.get('input')!r})")


def load_recipe(path: str | Path) -> Recipe:
    """Read and fully validate a recipe; raise :class:`RecipeError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    locator = _Locator(path, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, base_model and stages")
    try:
        spec = RecipeSpec.model_validate(raw)
    except ValidationError as err:
        raise _pydantic_error(locator, err, RecipeSpec, (), "") from None
    if not spec.stages:
        raise locator.error(("stages",), "the recipe has no stages")

    stages = {}
    for name, stage_spec in spec.stages.items():
        loc = ("stages", name)
        if not re.match(_NAME, name):
            raise locator.error(loc, f"stage name {name!r} must start with a letter and use letters, digits, _ or -")
        kinds = all_kinds()
        if stage_spec.uses not in kinds:
            raise locator.error(loc + ("uses",), f"stage {name!r}: unknown stage kind {stage_spec.uses!r}"
                                f"{did_you_mean(stage_spec.uses, kinds)}; known kinds: {', '.join(sorted(kinds))}")
        kind = kinds[stage_spec.uses]
        for slot_name, listed in stage_spec.inputs.items():
            slot = kind.slot(slot_name)
            if slot is None:
                hint = did_you_mean(slot_name, [s.name for s in kind.inputs])
                valid = ", ".join(s.name for s in kind.inputs) or "none"
                raise locator.error(loc + ("inputs", slot_name),
                                    f"stage {name!r}: {kind.name} has no input {slot_name!r}{hint}; inputs: {valid}")
            _check_listed_upstreams(locator, spec, name, slot, listed)
        for slot in kind.inputs:
            if not slot.optional and slot.name not in stage_spec.inputs:
                raise locator.error(loc, f"stage {name!r}: missing input {slot.name!r} ({kind.name} needs "
                                         f"an upstream {' or '.join(slot.accepts)} stage there)")
        params_raw = dict(stage_spec.params)
        if "model" in kind.params_model.model_fields and "model" not in params_raw \
                and kind.params_model.model_fields["model"].is_required():
            params_raw["model"] = spec.base_model  # stages naming a model default to the recipe's base
        try:
            params = kind.params_model.model_validate(params_raw)
        except ValidationError as err:
            raise _pydantic_error(locator, err, kind.params_model, loc + ("params",), f"stage {name!r} params: ") from None
        if stage_spec.processes > 1 and not _is_training(kind.params_model):
            raise locator.error(loc + ("processes",), f"stage {name!r}: processes={stage_spec.processes} needs a "
                                f"training stage; {kind.name} runs in one process (remove processes)")
        if stage_spec.register_as is not None:
            from tunegraph.model_registry import check_register  # lazy: it builds on lineage, which imports this

            problem = check_register(kind, stage_spec.register_as)
            if problem:
                raise locator.error(loc + ("register",), f"stage {name!r}: {problem}")
        if kind.check_inputs is not None:
            names = {slot: tuple(_as_list(value)) if kind.slot(slot).many else value
                     for slot, value in stage_spec.inputs.items()}
            try:
                kind.check_inputs(params, names)
            except InputsMismatch as err:
                raise locator.error(loc + err.location, f"stage {name!r}: {err}") from None
        stages[name] = Stage(name, stage_spec, kind, params)

    # artifact types along edges
    for name, stage in stages.items():
        for slot_name, listed in stage.spec.inputs.items():
            slot = stage.kind.slot(slot_name)
            for index, upstream in enumerate(_as_list(listed)):
                produced = stages[upstream].kind.produces
                if produced not in slot.accepts:
                    where = ("stages", name, "inputs", slot_name) + ((index,) if isinstance(listed, list) else ())
                    raise locator.error(where, f"stage {name!r} input {slot_name!r} takes a "
                                               f"{' or '.join(slot.accepts)}, but {upstream!r} "
                                               f"({stages[upstream].kind.name}) produces a {produced}")

    order = _topological_order(stages, locator)
    if spec.sweep is not None:
        from tunegraph.sweep import check_sweep  # lazy: sweep.py builds on this module

        check_sweep(spec, stages, locator)
    return Recipe(path=path, spec=spec, stages=stages, order=order)


def _is_training(params_model: type) -> bool:
    from tunegraph.training.params import TrainingParams  # lazy: torch is not needed to parse YAML

    return issubclass(params_model, TrainingParams)


def _as_list(listed: str | list[str]) -> list[str]:
    return [listed] if isinstance(listed, str) else list(listed)


def _check_listed_upstreams(locator: _Locator, spec: RecipeSpec, name: str, slot, listed: str | list[str]) -> None:
    """A slot's upstream stages exist; a list only where the slot takes many, non-empty, no repeats.
    (A single name is fine for a slot that takes many: a list of one.)"""
    where = ("stages", name, "inputs", slot.name)
    if isinstance(listed, list):
        if not slot.many:
            raise locator.error(where, f"stage {name!r} input {slot.name!r} takes one upstream stage, got a list "
                                       f"{listed}; name a single stage")
        if not listed:
            raise locator.error(where, f"stage {name!r} input {slot.name!r}: the list is empty; name one or more "
                                       f"upstream stages")
    for index, upstream in enumerate(_as_list(listed)):
        item = where + ((index,) if isinstance(listed, list) else ())
        if upstream not in spec.stages:
            hint = did_you_mean(upstream, spec.stages)
            raise locator.error(item, f"stage {name!r} input {slot.name!r}: no stage named {upstream!r}{hint}")
        if _as_list(listed).index(upstream) != index:
            raise locator.error(item, f"stage {name!r} input {slot.name!r} lists {upstream!r} twice")


def _topological_order(stages: dict[str, Stage], locator: _Locator) -> tuple[str, ...]:
    position = {name: i for i, name in enumerate(stages)}
    indegree = {name: len(s.spec.upstream_stages()) for name, s in stages.items()}
    children: dict[str, list[str]] = {name: [] for name in stages}
    for name, stage in stages.items():
        for parent in stage.spec.upstream_stages():
            children[parent].append(name)
    ready = sorted((n for n, d in indegree.items() if d == 0), key=position.get)
    order = []
    while ready:
        current = ready.pop(0)
        order.append(current)
        for child in children[current]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
                ready.sort(key=position.get)
    if len(order) < len(stages):
        cycle = _find_cycle(stages, {n for n in stages if n not in order})
        raise locator.error(("stages", cycle[0], "inputs"), f"stages form a cycle: {' -> '.join(cycle)}")
    return tuple(order)


def _find_cycle(stages: dict[str, Stage], candidates: set[str]) -> list[str]:
    start = sorted(candidates)[0]
    path, seen = [start], {start}
    current = start
    while True:
        nxt = next(p for p in stages[current].spec.upstream_stages() if p in candidates)
        if nxt in seen:
            cycle = path[path.index(nxt):] + [nxt]
            return list(reversed(cycle))
        path.append(nxt)
        seen.add(nxt)
        current = nxt
