"""The Prefect flow that walks a recipe: one task per stage, wired by the recipe's inputs.

Tasks are thin: the cache check (by stage fingerprint, see :mod:`tunegraph.lineage`) happens in
the task; a stage that must run is executed in a child process by ``tunegraph stage``, the entry
point DVC calls too. Prefect's own result cache is off (``NO_CACHE``): it cannot see the code a
task calls nor whether the artifact still exists on disk, and the fingerprint does both.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tunegraph.errors import StageError, TunegraphError
from tunegraph.flows.accelerator import ensure_accelerator_limit, stage_tags
from tunegraph.flows.task_runners import LOCAL_DASK, make_task_runner
from tunegraph.generation_cluster import stage_environment
from tunegraph.lineage import is_cached, plan_stage, read_manifest
from tunegraph.recipe import Recipe, load_recipe
from tunegraph.runner import StageOutcome, cached_outcome, read_metrics
from tunegraph.stage_process import run_stage_process, stage_command
from tunegraph.tracking import Tracker


class StageFailed(RuntimeError):
    """A stage crashed after its retries (a bug or the machine, not the recipe)."""


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes (OOM kill, flaky I/O); never retry a user error, it would fail the same way."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the state holds no readable exception: keep the retry policy
        return True
    return not isinstance(exc, TunegraphError)


@task(cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_user_error)
def run_stage(recipe_path: str, workspace: str, name: str, parent_run_id: str | None, force: bool) -> dict:
    """Reuse the stage's artifact when its fingerprint matches, else run it in a child process."""
    ws = Path(workspace)
    recipe = load_recipe(recipe_path)
    plan = plan_stage(recipe, ws, name)
    tracker = Tracker.for_recipe(recipe, ws)
    if not force and is_cached(plan):
        outcome = cached_outcome(plan)
        run_id = tracker.start_stage_run(plan, parent_run_id, runner="prefect")
        tracker.finish_stage_run(run_id, outcome)
        tracker.register_model(run_id, recipe, plan, outcome)  # a version only for a new content hash
        return _as_dict(outcome)
    started = time.monotonic()
    run_stage_process(stage_command(Path(recipe_path), ws, name, force=force, parent_run_id=parent_run_id,
                                    runner="prefect", processes=recipe.stages[name].spec.processes), name,
                      env=stage_environment())
    manifest = read_manifest(plan.out_dir)
    if manifest is None:
        raise StageError(f"stage {name!r} finished but left no artifact at {plan.out_dir}")
    outcome = StageOutcome(name, "ran", manifest["fingerprint"], manifest["content_hash"], read_metrics(plan),
                           time.monotonic() - started, plan.out_dir)
    return _as_dict(outcome)


def _as_dict(outcome: StageOutcome) -> dict:
    return {"stage": outcome.stage, "status": outcome.status, "fingerprint": outcome.fingerprint,
            "content_hash": outcome.content_hash, "metrics": outcome.metrics,
            "duration_s": round(outcome.duration_s, 2), "path": str(outcome.path)}


def select_stages(recipe: Recipe, only: list[str] | None, from_stage: str | None) -> list[str]:
    """Stages to run, in topological order: all, ``only`` these, or ``from_stage`` and its descendants."""
    for name in (only or []) + ([from_stage] if from_stage else []):
        if name not in recipe.stages:
            from tunegraph.suggest import did_you_mean

            raise StageError(f"{recipe.path}: no stage named {name!r}{did_you_mean(name, recipe.stages)}")
    chosen = set(recipe.order)
    if only:
        chosen = set(only)
    if from_stage:
        chosen &= {from_stage} | recipe.descendants(from_stage)
    return [name for name in recipe.order if name in chosen]


@flow(name="tunegraph-recipe", log_prints=False)
def recipe_flow(recipe_path: str, workspace: str = ".", only: list[str] | None = None,
                from_stage: str | None = None, force: bool = False) -> list[dict]:
    """Run a recipe's stages as Prefect tasks; returns one summary dict per stage (ran/cached/failed/skipped)."""
    from prefect.runtime import flow_run

    recipe = load_recipe(recipe_path)
    ws = Path(workspace).resolve()
    selected = select_stages(recipe, only, from_stage)
    tracker = Tracker.for_recipe(recipe, ws)
    parent = tracker.start_flow_run(recipe, run_name=f"{recipe.name}-{flow_run.get_name() or 'run'}",
                                    extra_tags={"prefect.flow_run_id": str(flow_run.get_id() or "")})
    futures = {}
    for name in selected:
        spec = recipe.stages[name].spec
        waits = [futures[p] for p in spec.upstream_stages() if p in futures]
        stage_task = run_stage.with_options(name=f"stage:{name}", retries=spec.retries,
                                            retry_delay_seconds=spec.retry_delay_s,
                                            tags=stage_tags(recipe.stages[name]))
        futures[name] = stage_task.submit(str(recipe.path), str(ws), name, parent, force, wait_for=waits)

    results, first_error = [], None
    for name in selected:
        try:
            results.append(futures[name].result())
        except Exception as exc:  # noqa: BLE001 - collected, re-raised below with the stage named
            upstream_failed = first_error is not None and name in _descendants_of_failed(recipe, results)
            results.append({"stage": name, "status": "skipped" if upstream_failed else "failed",
                            "metrics": {}, "duration_s": 0.0, "error": str(exc)})
            first_error = first_error or (name, exc)
    tracker.end_run(parent, status="FAILED" if first_error else "FINISHED")
    if first_error:
        name, exc = first_error
        message = str(exc) if str(exc).startswith(f"stage {name!r}") else f"stage {name!r}: {exc}"
        error = StageError(message) if isinstance(exc, TunegraphError) else StageFailed(message)
        error.stage_results = results  # the CLI still prints the table
        raise error from exc
    return results


def _descendants_of_failed(recipe: Recipe, results: list[dict]) -> set[str]:
    failed = [r["stage"] for r in results if r["status"] == "failed"]
    return set().union(*(recipe.descendants(f) for f in failed)) if failed else set()


def run_recipe(recipe_path: str, workspace: str = ".", only: list[str] | None = None, from_stage: str | None = None,
               force: bool = False, parallel: int = 1, dask: str | None = None,
               accelerator_slots: int | None = None) -> list[dict]:
    """Entry point used by the CLI: the flow with ``parallel`` concurrent stages, in threads or on Dask
    (see :mod:`tunegraph.flows.task_runners`), at most ``accelerator_slots`` of them on the accelerator."""
    ensure_accelerator_limit(accelerator_slots)
    runner = make_task_runner(parallel, dask)
    if dask not in (None, LOCAL_DASK):  # a remote worker's working directory is not this one
        recipe_path, workspace = str(Path(recipe_path).resolve()), str(Path(workspace).resolve())
    return recipe_flow.with_options(task_runner=runner)(recipe_path, workspace, only, from_stage, force)
