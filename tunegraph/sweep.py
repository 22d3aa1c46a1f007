"""Sweeps: a recipe's ``sweep:`` block runs one variant of the recipe per grid point, and ranks them.

```yaml
sweep:
  grid:                                        # every combination is one point
    stages.sft.params.learning_rate: [1.0e-4, 3.0e-4]
    stages.dpo.params.beta: [0.1, 0.3]
  metric: eval_sft.exact_match                 # STAGE.METRIC (or stages.STAGE.METRIC)
  goal: maximize                               # or minimize
```

A grid key is a key path into the recipe: ``stages.STAGE.params.KEY[.SUBKEY...]``, ``seed`` or
``base_model``. Each point is a plain recipe, written to ``<output root>/sweep/<point id>/recipe.yaml``
(the parent recipe with the point's values set, no ``sweep:`` block, its own ``output_dir`` and the
parent's MLflow experiment), so one point can be re-run or inspected alone.

Why one output root per point, with fingerprint-keyed sharing, rather than one root with renamed
stages: every point stays a real recipe with the stage names the user wrote, so ``tunegraph
report``/``compare``, the stage table and a point's ``recipe.yaml`` read as they would without a
sweep. Sharing is exact because it goes through the stage fingerprint: before a point runs, every
stage whose fingerprint equals that of an artifact an earlier point already holds (same kind,
params, upstream content, code, seed) gets that artifact, hard-linked (copied across file systems),
and then shows ``cached``. Stages no grid value reaches — the base model, the data — therefore run
once for the whole sweep, and every stage downstream of a varied value runs per point. Artifacts
are never modified in place (a re-run renames a new directory over the old one), so hard links
between points are safe. The point id is a hash of the point's values: adding values to a grid key
later keeps the ids, and so the artifacts, of the points already computed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunegraph.errors import StageError
from tunegraph.lineage import artifact_dir, is_cached, metrics_path, plan_stage
from tunegraph.recipe import Recipe, RecipeSpec, Stage, _pydantic_error  # the recipe's own error format
from tunegraph.suggest import did_you_mean

TOP_LEVEL_KEYS = ("seed", "base_model")  # recipe-wide keys a grid may vary besides stage params


@dataclass(frozen=True)
class SweepPoint:
    """One combination of grid values; ``id`` is a hash of them (stable when the grid grows)."""

    id: str
    values: dict[str, Any]  # grid key path -> value

    def label(self) -> str:
        return "  ".join(f"{short_key(key)}={value}" for key, value in self.values.items())


def short_key(path: str) -> str:
    """``stages.sft.params.learning_rate`` -> ``sft.learning_rate`` (for tables)."""
    parts = path.split(".")
    if len(parts) >= 4 and parts[0] == "stages" and parts[2] == "params":
        return ".".join([parts[1], *parts[3:]])
    return path


def metric_target(metric: str) -> tuple[str, str]:
    """``stages.eval_sft.exact_match`` or ``eval_sft.exact_match`` -> (stage, metric)."""
    stage, _, name = metric.removeprefix("stages.").partition(".")
    return stage, name


# ---------------------------------------------------------------- validation


def check_sweep(spec: RecipeSpec, stages: dict[str, Stage], locator) -> None:
    """Every grid key names a value the recipe has, every value validates, the metric names a stage.

    ``locator`` formats ``file:line: message`` errors (the recipe's :class:`_Locator`)."""
    sweep = spec.sweep
    if not sweep.grid:
        raise locator.error(("sweep", "grid"), "sweep grid is empty; give at least one key with a list of values")
    for path, values in sweep.grid.items():
        where = ("sweep", "grid", path)
        if not values:
            raise locator.error(where, f"sweep grid {path!r}: the list of values is empty")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < len(values):
            raise locator.error(where, f"sweep grid {path!r}: a value is listed twice in {values}")
        for value in values:
            _check_grid_value(spec, stages, locator, path, value)
    stage, name = metric_target(sweep.metric)
    if stage not in stages or not name:
        hint = did_you_mean(stage, stages) if stage not in stages else ""
        problem = f"no stage named {stage!r}{hint}" if stage not in stages else "it names no metric"
        raise locator.error(("sweep", "metric"), f"sweep metric {sweep.metric!r}: {problem}; write STAGE.METRIC, "
                                                 f"e.g. eval_sft.exact_match")


def _check_grid_value(spec: RecipeSpec, stages: dict[str, Stage], locator, path: str, value: Any) -> None:
    where = ("sweep", "grid", path)
    parts = path.split(".")
    if parts[0] in TOP_LEVEL_KEYS and len(parts) == 1:
        try:
            RecipeSpec.model_validate({**spec.model_dump(exclude={"sweep"}), parts[0]: value})
        except ValidationError as err:
            raise locator.error(where, f"sweep grid {path!r}: value {value!r}: {err.errors()[0]['msg']}") from None
        return
    if parts[0] != "stages" or len(parts) < 4 or parts[2] != "params":
        raise locator.error(where, f"sweep grid key {path!r}: a grid varies stages.STAGE.params.KEY, "
                                   f"{' or '.join(TOP_LEVEL_KEYS)}")
    name = parts[1]
    if name not in stages:
        raise locator.error(where, f"sweep grid key {path!r}: no stage named {name!r}{did_you_mean(name, stages)}")
    stage = stages[name]
    params = set_path(dict(stage.spec.params), parts[3:], value)
    model = stage.kind.params_model
    if "model" in model.model_fields and "model" not in params and model.model_fields["model"].is_required():
        params["model"] = spec.base_model
    try:
        model.model_validate(params)
    except ValidationError as err:
        raise _pydantic_error(locator, err, model, where, f"sweep grid {path!r} = {value!r}: stage {name!r} "
                                                          f"params: ") from None


def set_path(tree: dict, keys: list[str], value: Any) -> dict:
    """A copy of ``tree`` with ``tree[k0][k1]...`` set to ``value`` (missing mappings are created)."""
    copy = dict(tree)
    if len(keys) == 1:
        copy[keys[0]] = value
        return copy
    child = copy.get(keys[0])
    copy[keys[0]] = set_path(child if isinstance(child, dict) else {}, keys[1:], value)
    return copy


# ---------------------------------------------------------------- points and variants


def grid_points(recipe: Recipe) -> list[SweepPoint]:
    """Every combination of the grid's values, in the order the grid lists keys and values."""
    grid = recipe.spec.sweep.grid
    points = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
        points.append(SweepPoint(digest[:8], values))
    return points


def sweep_root(recipe: Recipe, workspace: Path) -> Path:
    return recipe.output_root(workspace) / "sweep"


def write_variant(recipe: Recipe, point: SweepPoint, workspace: Path) -> Path:
    """The point's recipe file: the parent's YAML with the point's values, its own outputs, no sweep."""
    raw = yaml.safe_load(recipe.path.read_text(encoding="utf-8"))
    raw.pop("sweep", None)
    for path, value in point.values.items():
        raw = set_path(raw, path.split("."), value)
    root = sweep_root(recipe, workspace) / point.id
    raw["name"] = f"{recipe.name}-{point.id}"
    raw["output_dir"] = root.relative_to(workspace).as_posix() if root.is_relative_to(workspace) else str(root)
    raw["tracking"] = {**(raw.get("tracking") or {}), "experiment": recipe.spec.tracking.experiment or recipe.name}
    header = (f"# Sweep point {point.id} of {recipe.path}: {point.label()}\n"
              f"# Written by `tunegraph run {recipe.path}`; edit the parent recipe, not this file.\n")
    root.mkdir(parents=True, exist_ok=True)
    target = root / "recipe.yaml"
    tmp = root / f".recipe.yaml.tmp-{os.getpid()}"
    tmp.write_text(header + yaml.safe_dump(raw, sort_keys=False, width=120), encoding="utf-8")
    tmp.replace(target)
    return target


# ---------------------------------------------------------------- sharing by fingerprint


def share_artifacts(variant: Recipe, workspace: Path, donors: list[Recipe]) -> dict[str, str]:
    """Give ``variant`` every artifact a donor point holds with the fingerprint ``variant`` would compute.

    Walks the stages in topological order, so a shared stage's content hash lets its children's
    fingerprints be computed (and shared) in turn. Returns {stage: donor recipe name} for what it linked."""
    shared = {}
    for name in variant.order:
        try:
            plan = plan_stage(variant, workspace, name)
        except StageError:  # an upstream artifact is missing: this stage will run, its children too
            continue
        if is_cached(plan):
            continue
        for donor in donors:
            donor_plan = replace(plan, out_dir=artifact_dir(donor, workspace, name),
                                 metrics_path=metrics_path(donor, workspace, name))
            if is_cached(donor_plan):  # same fingerprint, all files present
                _link_artifact(donor_plan.out_dir, plan.out_dir)
                _copy_atomic(donor_plan.metrics_path, plan.metrics_path)
                shared[name] = donor.name
                break
    return shared


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy holds the same bytes
        shutil.copy2(source, target)


def _link_artifact(source: Path, target: Path) -> None:
    """Hard-link ``source`` into ``target``, swapped in whole (as the runner commits artifacts)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.share-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _copy_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


# ---------------------------------------------------------------- ranking


@dataclass(frozen=True)
class PointOutcome:
    """What one point's flow run gave: its stage results, the ranking metric, its MLflow run."""

    point: SweepPoint
    status: str  # "ok" or "failed"
    value: float | None
    stages: list[dict]
    shared: dict[str, str]
    mlflow_run_id: str | None
    error: str = ""


def metric_value(stages: list[dict], metric: str) -> float | None:
    stage, name = metric_target(metric)
    for result in stages:
        if result.get("stage") == stage and name in (result.get("metrics") or {}):
            return float(result["metrics"][name])
    return None


def ranked(outcomes: list[PointOutcome], goal: str) -> list[PointOutcome]:
    """Best first by the metric; points without a value (failed, not selected) last, in grid order."""
    sign = -1.0 if goal == "maximize" else 1.0
    scored = sorted((o for o in outcomes if o.value is not None), key=lambda o: sign * o.value)
    return scored + [o for o in outcomes if o.value is None]


def print_ranking(recipe: Recipe, outcomes: list[PointOutcome], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    sweep = recipe.spec.sweep
    table = Table(title=f"tunegraph sweep · {recipe.name} · {len(outcomes)} points · "
                        f"{sweep.goal} {sweep.metric}")
    for column in ("rank", "point", *[short_key(k) for k in sweep.grid], sweep.metric, "stages", "mlflow run"):
        table.add_column(column)
    for rank, outcome in enumerate(ranked(outcomes, sweep.goal), start=1):
        counts = {}
        for result in outcome.stages:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        stages = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        value = f"{outcome.value:.4g}" if outcome.value is not None else (outcome.status if outcome.status != "ok"
                                                                           else "not reported")
        table.add_row(str(rank) if outcome.value is not None else "-", outcome.point.id,
                      *[str(v) for v in outcome.point.values.values()], value, stages or outcome.error[:60],
                      (outcome.mlflow_run_id or "")[:12])
    console.print(table)
    console.print(f"points:     {sweep_root_display(recipe)}/<point>/recipe.yaml and its artifacts")
    console.print(f"a point:    tunegraph report {recipe.path} <mlflow run>   ·   "
                  f"tunegraph compare {recipe.path} <run> <run>")


def sweep_root_display(recipe: Recipe) -> str:
    return f"{recipe.spec.output_dir or f'data/out/{recipe.name}'}/sweep"
