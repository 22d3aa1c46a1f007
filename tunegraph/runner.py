"""Run one stage in this process: plan, seed, call the stage function, commit atomically.

The stage writes into a fresh temp directory beside its final place; the manifest and the
metrics file are written, then the directory is renamed into place. A crash or a user error
leaves the previous artifact (if any) untouched and no half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunegraph import distributed
from tunegraph.context import StageContext, StepLogger, seed_everything
from tunegraph.errors import StageError
from tunegraph.hashing import MANIFEST_NAME
from tunegraph.lineage import StagePlan, build_manifest, is_cached, plan_stage, read_manifest, write_json
from tunegraph.recipe import Recipe
from tunegraph.registry import StageResult


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # "ran" or "cached"
    fingerprint: str
    content_hash: str
    metrics: dict[str, float]
    duration_s: float
    path: Path
    timings: dict[str, float] = field(default_factory=dict)


def read_metrics(plan: StagePlan) -> dict[str, float]:
    if not plan.metrics_path.is_file():
        return {}
    return json.loads(plan.metrics_path.read_text(encoding="utf-8"))


def cached_outcome(plan: StagePlan) -> StageOutcome:
    manifest = read_manifest(plan.out_dir)
    return StageOutcome(plan.name, "cached", plan.fingerprint, manifest["content_hash"], read_metrics(plan), 0.0,
                        plan.out_dir)


def execute_stage(
    recipe: Recipe,
    workspace: Path,
    name: str,
    *,
    force: bool = False,
    step_logger: StepLogger | None = None,
    plan: StagePlan | None = None,
) -> StageOutcome:
    """Run stage ``name`` unless its artifact is cached (same fingerprint); return what happened."""
    plan = plan or plan_stage(recipe, workspace, name)
    if not force and is_cached(plan):
        return cached_outcome(plan)
    stage = recipe.stages[name]
    started = time.monotonic()
    seed_everything(plan.seed, plan.threads)
    ctx = StageContext(stage=name, seed=plan.seed, threads=plan.threads, workspace=workspace, step_logger=step_logger,
                       checkpoint_dir=workspace / ".tunegraph" / "checkpoints" / name / plan.fingerprint[:16])

    plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
    world = distributed.current_world()
    if not world.is_main:  # data-parallel helper rank: trains alongside rank 0, which alone commits
        return _run_helper_rank(stage, plan, ctx, world, started)
    for stale in plan.out_dir.parent.glob(f".{name}.tmp-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = plan.out_dir.parent / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        result = stage.kind.fn(stage.params, dict(plan.inputs), tmp, ctx)
        if not isinstance(result, StageResult):
            raise TypeError(f"stage kind {stage.kind.name!r} returned {type(result).__name__}, not StageResult")
        if (tmp / MANIFEST_NAME).exists():
            raise StageError(f"stage {name!r} wrote {MANIFEST_NAME} itself; that name is reserved for the lineage")
        manifest = build_manifest(plan, stage.kind.produces, tmp)
        write_json(tmp / MANIFEST_NAME, manifest)
        _commit_dir(tmp, plan.out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.checkpoint_dir is not None:  # the artifact is committed: resume points are no longer needed
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    _write_json_atomic(plan.metrics_path, result.metrics)
    return StageOutcome(name, "ran", plan.fingerprint, manifest["content_hash"], dict(result.metrics),
                        time.monotonic() - started, plan.out_dir, dict(result.timings))


def _run_helper_rank(stage, plan: StagePlan, ctx: StageContext, world: distributed.World,
                     started: float) -> StageOutcome:
    """Run the stage function on a non-zero rank into a scratch dir that is then thrown away."""
    scratch = plan.out_dir.parent / f".{plan.name}.rank{world.rank}-{os.getpid()}"
    scratch.mkdir()
    try:
        result = stage.kind.fn(stage.params, dict(plan.inputs), scratch, ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return StageOutcome(plan.name, "ran", plan.fingerprint, "", dict(result.metrics), time.monotonic() - started,
                        plan.out_dir, dict(result.timings))


def _commit_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final``: at every instant one complete version exists on disk."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_json(tmp, value)
    os.replace(tmp, path)
