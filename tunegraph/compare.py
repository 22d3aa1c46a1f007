"""`tunegraph compare`: flow runs side by side from MLflow — metrics per stage and the params that differ.

A flow run is an MLflow run tagged ``tunegraph.role=flow``; its stages are nested runs tagged with the
stage name. Runs are named by a run-id prefix, or the newest N of the recipe's experiment are taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from tunegraph.errors import TunegraphError

_HIDDEN_METRICS = ("duration_s", "train_seconds", "tokens_per_s")  # timings: vary run to run


@dataclass(frozen=True)
class FlowRun:
    run_id: str
    name: str
    start_time: int
    stages: dict[str, object]  # stage name -> mlflow Run


def load_flow_runs(client, experiment_name: str, run_ids: list[str], last: int) -> list[FlowRun]:
    """The flow runs named by id prefix, or the newest ``last`` ones, oldest first."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TunegraphError(f"no MLflow experiment {experiment_name!r} in this store: run the recipe first")
    parents = client.search_runs([experiment.experiment_id], "tags.`tunegraph.role` = 'flow'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    if run_ids:
        chosen = []
        for prefix in run_ids:
            matches = [p for p in parents if p.info.run_id.startswith(prefix) or p.info.run_name == prefix]
            if len(matches) != 1:
                raise TunegraphError(f"run {prefix!r} matches {len(matches)} flow runs of experiment "
                                     f"{experiment_name!r}; give a longer run-id prefix (see `mlflow ui`)")
            chosen.append(matches[0])
    else:
        chosen = parents[:last]
    if len(chosen) < 2:
        raise TunegraphError(f"experiment {experiment_name!r} has {len(chosen)} flow run(s); compare needs two or more")
    runs = []
    for parent in sorted(chosen, key=lambda r: r.info.start_time):
        children = client.search_runs([experiment.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
        stages = {c.data.tags.get("tunegraph.stage"): c for c in children if c.data.tags.get("tunegraph.stage")}
        runs.append(FlowRun(parent.info.run_id, parent.info.run_name or parent.info.run_id[:8],
                            parent.info.start_time, stages))
    return runs


def metric_rows(runs: list[FlowRun], show_timings: bool = False) -> list[tuple[str, str, list[float | None]]]:
    """(stage, metric, value per run) for every metric any run's stage reported."""
    rows = []
    for stage in sorted({s for run in runs for s in run.stages}):
        names = sorted({m for run in runs if stage in run.stages for m in run.stages[stage].data.metrics})
        for name in names:
            if not show_timings and name in _HIDDEN_METRICS:
                continue
            rows.append((stage, name, [run.stages[stage].data.metrics.get(name) if stage in run.stages else None
                                       for run in runs]))
    return rows


def differing_params(runs: list[FlowRun]) -> list[tuple[str, str, list[str | None]]]:
    """(stage, param, value per run) for the params whose values are not all equal."""
    rows = []
    for stage in sorted({s for run in runs for s in run.stages}):
        names = sorted({p for run in runs if stage in run.stages for p in run.stages[stage].data.params})
        for name in names:
            values = [run.stages[stage].data.params.get(name) if stage in run.stages else None for run in runs]
            if len(set(values)) > 1:
                rows.append((stage, name, values))
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_comparison(runs: list[FlowRun], show_timings: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    headers = [f"{run.name} ({run.run_id[:8]})" for run in runs]
    metrics = Table(title="metrics per stage")
    for column in ("stage", "metric", *headers):
        metrics.add_column(column)
    if len(runs) == 2:
        metrics.add_column("delta")
    for stage, name, values in metric_rows(runs, show_timings):
        delta = []
        if len(runs) == 2:
            delta = [_cell(values[1] - values[0]) if None not in values else "-"]
        style = "" if len(set(values)) == 1 else "bold"
        metrics.add_row(stage, name, *[_cell(v) for v in values], *delta, style=style)
    console.print(metrics)
    params = Table(title="params that differ")
    for column in ("stage", "param", *headers):
        params.add_column(column)
    differing = differing_params(runs)
    for stage, name, values in differing:
        params.add_row(stage, name, *[_cell(v) for v in values])
    if differing:
        console.print(params)
    else:
        console.print("params: identical in every stage")
