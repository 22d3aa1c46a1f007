"""The Prefect flow of a sweep: one parent flow, one child flow run (the recipe flow) per grid point.

Points run one after another: a point's stages that no grid value reaches are shared with the
points before it by fingerprint (see :mod:`tunegraph.sweep`), so they must have run first. Within a
point, ``--parallel`` runs independent stages at once as in a plain run.

MLflow: the sweep is a run tagged ``tunegraph.role=sweep``; each point's flow run (made by the
recipe flow, tagged ``role=flow`` as usual) is nested under it, with the point's values as params
and ``tunegraph.sweep.point`` as tag. A failed point does not stop the others; it ranks last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow

from tunegraph.flows.accelerator import ensure_accelerator_limit
from tunegraph.flows.recipe_flow import recipe_flow, select_stages
from tunegraph.flows.task_runners import LOCAL_DASK, make_task_runner
from tunegraph.recipe import Recipe, load_recipe
from tunegraph.sweep import (PointOutcome, SweepPoint, grid_points, metric_value, ranked, share_artifacts, short_key,
                             write_variant)
from tunegraph.tracking import Tracker, flatten_params, git_commit


def _point_flow_run(tracker: Tracker, prefect_flow_run_id: str | None):
    """The MLflow flow run the recipe flow created for the child flow run ``prefect_flow_run_id``."""
    if not prefect_flow_run_id:
        return None
    found = tracker.client.search_runs([tracker.experiment_id],
                                       f"tags.`prefect.flow_run_id` = '{prefect_flow_run_id}'", max_results=1)
    return found[0].info.run_id if found else None


def _start_sweep_run(tracker: Tracker, recipe: Recipe, run_name: str, prefect_id: str) -> str:
    sweep = recipe.spec.sweep
    run = tracker.client.create_run(tracker.experiment_id, run_name=run_name, tags={
        "tunegraph.recipe": str(recipe.path), "tunegraph.role": "sweep", "prefect.flow_run_id": prefect_id,
        "mlflow.source.git.commit": git_commit(tracker.workspace)})
    params = flatten_params({"recipe": recipe.name, "metric": sweep.metric, "goal": sweep.goal,
                             "grid": {short_key(k): v for k, v in sweep.grid.items()}})
    tracker.client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in sorted(params.items())])
    return run.info.run_id


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _adopt_point_run(tracker: Tracker, run_id: str, sweep_run_id: str, point: SweepPoint) -> None:
    """Nest the point's flow run under the sweep run and record the point's values on it."""
    from mlflow.entities import RunTag

    tracker.client.log_batch(run_id, tags=[RunTag("mlflow.parentRunId", sweep_run_id),
                                           RunTag("tunegraph.sweep.point", point.id)],
                             params=[_param(f"sweep.{short_key(k)}", str(v)) for k, v in point.values.items()])


@flow(name="tunegraph-sweep", log_prints=False)
def sweep_flow(recipe_path: str, workspace: str = ".", only: list[str] | None = None, from_stage: str | None = None,
               force: bool = False, parallel: int = 1, dask: str | None = None) -> list[dict]:
    """Run every grid point of the recipe's sweep as a child flow run; returns one dict per point, grid order."""
    from prefect.runtime import flow_run

    recipe = load_recipe(recipe_path)
    ws = Path(workspace).resolve()
    tracker = Tracker.for_recipe(recipe, ws)
    sweep_run = _start_sweep_run(tracker, recipe, f"{recipe.name}-sweep-{flow_run.get_name() or 'run'}",
                                 str(flow_run.get_id() or ""))
    points = grid_points(recipe)
    donors: list[Recipe] = []
    outcomes: list[PointOutcome] = []
    for index, point in enumerate(points, start=1):
        variant = load_recipe(write_variant(recipe, point, ws))
        # --force recomputes every point's stages: sharing would hand a later point the artifacts the
        # force was meant to replace (documented in docs/report-and-sweeps.md)
        shared = {} if force else share_artifacts(variant, ws, donors)
        print(f"sweep point {index}/{len(points)} {point.id}: {point.label()}"
              + (f"  (shares {', '.join(shared)} with earlier points)" if shared else ""), file=sys.stderr, flush=True)
        point_flow = recipe_flow.with_options(task_runner=make_task_runner(parallel, dask))
        state = point_flow(str(variant.path), str(ws), only, from_stage, force, return_state=True)
        run_id = _point_flow_run(tracker, str(state.state_details.flow_run_id or ""))
        if run_id:
            _adopt_point_run(tracker, run_id, sweep_run, point)
        result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            stages = list(getattr(result, "stage_results", None) or [])
            outcomes.append(PointOutcome(point, "failed", metric_value(stages, recipe.spec.sweep.metric), stages,
                                         shared, run_id, f"{type(result).__name__}: {result}"))
        else:
            outcomes.append(PointOutcome(point, "ok", metric_value(result, recipe.spec.sweep.metric), list(result),
                                         shared, run_id))
        donors.append(variant)
    _finish_sweep_run(tracker, recipe, sweep_run, outcomes)
    return [_as_dict(o) for o in outcomes]


def _finish_sweep_run(tracker: Tracker, recipe: Recipe, sweep_run: str, outcomes: list[PointOutcome]) -> None:
    order = ranked(outcomes, recipe.spec.sweep.goal)
    ranking = [{"rank": i, "point": o.point.id, "values": o.point.values, "value": o.value, "status": o.status,
                "mlflow_run_id": o.mlflow_run_id} for i, o in enumerate(order, start=1)]
    tracker.client.log_text(sweep_run, json.dumps(ranking, indent=2, default=str) + "\n", "ranking.json")
    if order and order[0].value is not None:
        tracker.client.log_metric(sweep_run, f"best.{recipe.spec.sweep.metric}", order[0].value)
        tracker.client.set_tag(sweep_run, "tunegraph.sweep.best_point", order[0].point.id)
    tracker.end_run(sweep_run, status="FAILED" if any(o.status != "ok" for o in outcomes) else "FINISHED")


def _as_dict(outcome: PointOutcome) -> dict:
    return {"point": outcome.point.id, "values": outcome.point.values, "status": outcome.status,
            "value": outcome.value, "stages": outcome.stages, "shared": outcome.shared,
            "mlflow_run_id": outcome.mlflow_run_id, "error": outcome.error}


def run_sweep(recipe_path: str, workspace: str = ".", only: list[str] | None = None, from_stage: str | None = None,
              force: bool = False, parallel: int = 1, dask: str | None = None,
              accelerator_slots: int | None = None) -> list[PointOutcome]:
    """Entry point used by the CLI; returns the points' outcomes in grid order."""
    recipe = load_recipe(recipe_path)
    select_stages(recipe, only, from_stage)  # a bad --only fails once, not once per point
    ensure_accelerator_limit(accelerator_slots)
    if dask not in (None, LOCAL_DASK):  # a remote worker's working directory is not this one
        recipe_path, workspace = str(Path(recipe_path).resolve()), str(Path(workspace).resolve())
    rows = sweep_flow(recipe_path, workspace, only, from_stage, force, parallel, dask)
    points = {p.id: p for p in grid_points(recipe)}
    return [PointOutcome(points[r["point"]], r["status"], r["value"], r["stages"], r["shared"], r["mlflow_run_id"],
                         r["error"]) for r in rows]
