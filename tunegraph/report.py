"""`tunegraph report`: one self-contained HTML page for a flow run, read back from MLflow.

The page holds the stage table (status, duration, fingerprint, key metrics), a timeline of the stage
runs, per-step curves (loss, reward, KL, ...) of every training stage, the data funnel of every data
stage with a ``data_card.json``, and the eval scores of every evaluate stage side by side, with deltas
against each stage's declared baseline and against the eval of the base model on the same data.
Images are PNGs embedded as base64 (matplotlib, Agg): no JavaScript, no files beside the page.

A stage that was ``cached`` in this flow run logged no step metrics and no files; they are taken
from the MLflow run that produced its artifact (same fingerprint, status ``ran``), else the files
from the artifact on disk when its content hash is still the one this run recorded.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunegraph import report_plots
from tunegraph.errors import TunegraphError

_TIMINGS = ("duration_s", "train_seconds", "tokens_per_s")  # vary run to run: not "key metrics"
_NOT_CURVES = ("tokens_per_s",)  # noisy wall-clock speed, not a learning curve
_RATE_METRICS = ("exact_match", "contains_match", "verifiable_accuracy")


@dataclass(frozen=True)
class StageView:
    """One stage run of the flow run, with what the report shows of it."""

    name: str
    kind: str
    status: str
    start_s: float  # since the flow run started
    end_s: float
    fingerprint: str
    metrics: dict[str, float]
    upstream: dict[str, str]  # slot -> upstream stage name
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    data_card: dict | None = None
    card_plots: dict[str, bytes] = field(default_factory=dict)
    source_run: str | None = None  # the MLflow run that produced the artifact


@dataclass(frozen=True)
class RunView:
    recipe: str
    experiment: str
    run_id: str
    run_name: str
    status: str
    started_ms: int
    ended_ms: int | None
    git_commit: str
    stages: list[StageView]


def find_flow_run(client, experiment_name: str, ref: str | None):
    """The flow run named by a run-id prefix or run name, or the newest one of the experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TunegraphError(f"no MLflow experiment {experiment_name!r} in this store: run the recipe first")
    parents = client.search_runs([experiment.experiment_id], "tags.`tunegraph.role` = 'flow'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    if ref is None:
        if not parents:
            raise TunegraphError(f"experiment {experiment_name!r} has no flow runs: run the recipe first")
        return parents[0]
    matches = [p for p in parents if p.info.run_id.startswith(ref) or p.info.run_name == ref]
    if len(matches) != 1:
        raise TunegraphError(f"run {ref!r} matches {len(matches)} flow runs of experiment {experiment_name!r}; "
                             f"give a longer run-id prefix or the run name (see `mlflow ui`)")
    return matches[0]


def _source_run(client, run):
    """The run that produced the stage's artifact: this one if it ran, else the newest that ran it."""
    tags = run.data.tags
    if tags.get("tunegraph.status") == "ran":
        return run
    fingerprint = tags.get("tunegraph.fingerprint")
    if not fingerprint:
        return None
    found = client.search_runs([run.info.experiment_id],
                               f"tags.`tunegraph.fingerprint` = '{fingerprint}' and tags.`tunegraph.status` = 'ran'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def _curves(client, run) -> dict[str, list[tuple[int, float]]]:
    """Metrics logged at more than one step, as (step, value); the first value logged at a step wins."""
    curves = {}
    for key in sorted(run.data.metrics):
        if key in _NOT_CURVES:
            continue
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        points = dict(reversed([(m.step, m.value) for m in history]))  # reversed: the earliest per step stays
        if len(points) > 1:
            curves[key] = sorted(points.items())
    return curves


def _artifact_bytes(client, run, source, name: str, scratch: Path) -> bytes | None:
    """A file of the stage's artifact: from the artifact directory when its content hash is still the one
    this run recorded, else from the producing run's MLflow artifacts."""
    tags = run.data.tags
    directory = Path(tags.get("tunegraph.artifact", "")) if tags.get("tunegraph.artifact") else None
    if directory is not None and (directory / name).is_file():
        try:
            manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("content_hash") == tags.get("tunegraph.content_hash"):
            return (directory / name).read_bytes()
    if source is None or not any(a.path == name for a in client.list_artifacts(source.info.run_id)):
        return None
    return Path(client.download_artifacts(source.info.run_id, name, str(scratch))).read_bytes()


def _stage_view(client, run, flow_start_ms: int, scratch: Path) -> StageView:
    tags = run.data.tags
    source = _source_run(client, run)
    card_bytes = _artifact_bytes(client, run, source, "data_card.json", scratch)
    card = json.loads(card_bytes) if card_bytes else None
    plots = {}
    for plot in (card or {}).get("plots", []):
        png = _artifact_bytes(client, run, source, plot, scratch)
        if png is not None:
            plots[plot] = png
    end_ms = run.info.end_time or int(time.time() * 1000)
    status = tags.get("tunegraph.status") or run.info.status.lower()  # a failed stage has no tunegraph status
    return StageView(
        name=tags["tunegraph.stage"], kind=tags.get("tunegraph.kind", "?"), status=status,
        start_s=(run.info.start_time - flow_start_ms) / 1000,
        end_s=(end_ms - flow_start_ms) / 1000, fingerprint=tags.get("tunegraph.fingerprint", ""),
        metrics=dict(run.data.metrics),
        upstream={k.removeprefix("tunegraph.upstream."): v.split("@")[0] for k, v in tags.items()
                  if k.startswith("tunegraph.upstream.")},
        curves=_curves(client, source) if source is not None else {}, data_card=card, card_plots=plots,
        source_run=source.info.run_id if source is not None else None)


def collect_run(client, experiment_name: str, recipe_name: str, ref: str | None) -> RunView:
    """Everything the report shows of one flow run, read from the MLflow store (and artifact dirs)."""
    parent = find_flow_run(client, experiment_name, ref)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    with tempfile.TemporaryDirectory(prefix="tunegraph-report-") as scratch:
        stages = [_stage_view(client, child, parent.info.start_time, Path(scratch)) for child in children
                  if child.data.tags.get("tunegraph.stage")]
    stages.sort(key=lambda s: (s.start_s, s.name))
    return RunView(recipe=recipe_name, experiment=experiment_name, run_id=parent.info.run_id,
                   run_name=parent.info.run_name or parent.info.run_id[:8], status=parent.info.status,
                   started_ms=parent.info.start_time, ended_ms=parent.info.end_time,
                   git_commit=parent.data.tags.get("mlflow.source.git.commit", "unknown"), stages=stages)


# ---------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #212121; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #616161; } .ran { color: #2e7d32; } .cached { color: #0288d1; } .failed { color: #c62828; }
.skipped { color: #f9a825; } img { max-width: 100%; display: block; margin: .5em 0; }
code { background: #f5f5f5; padding: 0 .2em; } .up { color: #2e7d32; } .down { color: #c62828; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _number(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _key_metrics(stage: StageView, summary: dict[str, tuple[str, ...]]) -> str:
    shown = [k for k in summary.get(stage.kind, ()) if k in stage.metrics]
    shown = shown or [k for k in sorted(stage.metrics) if k not in _TIMINGS][:3]
    return "  ".join(f"{k}={_number(stage.metrics[k])}" for k in shown)


def _stage_table(view: RunView, summary: dict[str, tuple[str, ...]]) -> str:
    rows = []
    for stage in view.stages:
        duration = stage.metrics.get("duration_s", stage.end_s - stage.start_s)
        rows.append(f"<tr><td>{_esc(stage.name)}</td><td>{_esc(stage.kind)}</td>"
                    f'<td class="{_esc(stage.status)}">{_esc(stage.status)}</td><td class="num">{duration:.1f} s</td>'
                    f"<td><code>{_esc(stage.fingerprint[:12])}</code></td><td>{_esc(_key_metrics(stage, summary))}</td></tr>")
    return ("<table><tr><th>stage</th><th>kind</th><th>status</th><th>duration</th><th>fingerprint</th>"
            "<th>key metrics</th></tr>" + "".join(rows) + "</table>")


def _training_section(view: RunView) -> str:
    parts = []
    for stage in view.stages:
        if not stage.curves:
            continue
        note = "" if stage.status == "ran" else (f'<p class="meta">cached here; curves of the run that produced it '
                                                  f"(<code>{_esc((stage.source_run or '')[:12])}</code>)</p>")
        parts.append(f"<h3>{_esc(stage.name)} ({_esc(stage.kind)})</h3>{note}"
                     + _img(report_plots.curves_png(stage.name, stage.curves), f"{stage.name} per-step metrics"))
    return "".join(parts) or '<p class="meta">no stage of this run logged per-step metrics</p>'


def _data_section(view: RunView) -> str:
    parts = []
    for stage in view.stages:
        card = stage.data_card
        if not card or "funnel" not in card:
            continue
        funnel = card["funnel"]
        steps = [("input", int(funnel["rows_in"]))] + [(s["step"], int(s["kept"])) for s in funnel.get("steps", [])]
        kept = "".join(f"<tr><td>{_esc(step)}</td><td class='num'>{count}</td>"
                       f"<td class='num'>{previous - count if index else ''}</td></tr>"
                       for index, ((step, count), (_, previous)) in enumerate(zip(steps, [steps[0]] + steps)))
        removed = "".join(f"<tr><td>{_esc(reason)}</td><td class='num'>{count}</td></tr>"
                          for reason, count in funnel.get("removed_per_reason", {}).items())
        parts.append(f"<h3>{_esc(stage.name)}</h3><p>{funnel['rows_in']} rows in, {funnel['rows_out']} kept</p>"
                     + _img(report_plots.funnel_png(stage.name, steps), f"{stage.name} data funnel")
                     + f"<table><tr><th>step</th><th>rows kept</th><th>removed</th></tr>{kept}</table>"
                     + (f"<table><tr><th>removed because</th><th>rows</th></tr>{removed}</table>" if removed else "")
                     + "".join(_img(png, f"{stage.name} {name}") for name, png in stage.card_plots.items()))
    return "".join(parts) or '<p class="meta">no stage of this run has a data card</p>'


def _base_model_evals(view: RunView, eval_kinds: set[str], model_kinds: set[str]) -> dict[str, StageView]:
    """Eval stages whose model input is an imported (untrained) model, by the dataset stage they used."""
    kinds = {s.name: s.kind for s in view.stages}
    return {s.upstream.get("dataset", ""): s for s in view.stages
            if s.kind in eval_kinds and kinds.get(s.upstream.get("model", "")) in model_kinds}


def _eval_section(view: RunView, eval_kinds: set[str]) -> str:
    evals = [s for s in view.stages if s.kind in eval_kinds]
    if not evals:
        return '<p class="meta">no evaluate stage in this run</p>'
    base_evals = _base_model_evals(view, eval_kinds, {"import_model"})
    names = sorted({k for s in evals for k in s.metrics if not k.startswith("delta_") and k not in _TIMINGS},
                   key=lambda k: (k not in _RATE_METRICS, k))
    header = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = []
    for stage in evals:
        base = base_evals.get(stage.upstream.get("dataset", ""))
        cells = []
        for name in names:
            value = stage.metrics.get(name)
            if value is None:
                cells.append("<td>-</td>")
                continue
            notes = []
            if f"delta_{name}" in stage.metrics:
                notes.append(_delta(stage.metrics[f"delta_{name}"], f"vs {stage.upstream.get('baseline', 'baseline')}"))
            if base is not None and base is not stage and name in base.metrics and stage.upstream.get("baseline") != base.name:
                notes.append(_delta(value - base.metrics[name], f"vs {base.name}"))
            cells.append(f"<td class='num'>{_number(value)}{'<br>' if notes else ''}{'<br>'.join(notes)}</td>")
        model = stage.upstream.get("model", "?")
        role = " (base model)" if base is stage else ""
        rows.append(f"<tr><td>{_esc(stage.name)}</td><td>{_esc(model)}{role}</td>"
                    f"<td>{_esc(stage.upstream.get('dataset', '?'))}</td>{''.join(cells)}</tr>")
    rates = [n for n in _RATE_METRICS if any(n in s.metrics for s in evals)]
    chart = _img(report_plots.eval_png([s.name for s in evals], [s.metrics for s in evals], rates),
                 "eval scores per stage") if rates or any("perplexity" in s.metrics for s in evals) else ""
    return (f"<table><tr><th>eval stage</th><th>model</th><th>data</th>{header}</tr>{''.join(rows)}</table>"
            + chart)


def _delta(value: float, against: str) -> str:
    css = "up" if value > 0 else "down" if value < 0 else ""
    return f"<small class='{css}'>{value:+.4g} {_esc(against)}</small>"


def render_html(view: RunView, summary_metrics: dict[str, tuple[str, ...]], eval_kinds: set[str]) -> str:
    """The whole page. ``summary_metrics``: key metrics per stage kind; ``eval_kinds``: kinds producing evals."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view.started_ms / 1000))
    wall = f"{(view.ended_ms - view.started_ms) / 1000:.1f} s" if view.ended_ms else "still running"
    bars = [(s.name, s.status, s.start_s, s.end_s) for s in view.stages]
    timeline = _img(report_plots.timeline_png(bars), "stage timeline") if bars else "<p>no stage runs</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>tunegraph · {_esc(view.recipe)} · {_esc(view.run_name)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>tunegraph run report: {_esc(view.recipe)}</h1>
<p class="meta">flow run <b>{_esc(view.run_name)}</b> (<code>{_esc(view.run_id)}</code>) · {_esc(view.status)} ·
started {started} · {wall} · experiment {_esc(view.experiment)} · git {_esc(view.git_commit[:14])}</p>
<h2 id="stages">Stages</h2>
{_stage_table(view, summary_metrics)}
<h2 id="timeline">Timeline</h2>
{timeline}
<h2 id="training">Training curves</h2>
{_training_section(view)}
<h2 id="data">Data funnel</h2>
{_data_section(view)}
<h2 id="eval">Evaluation</h2>
{_eval_section(view, eval_kinds)}
</body></html>
"""


def write_report(recipe, workspace: Path, run_ref: str | None = None, output: Path | None = None) -> Path:
    """Build the report of a flow run of ``recipe`` (default: the newest) and write it atomically.

    ``output`` defaults to ``<workspace>/.tunegraph/reports/<run name>.html``."""
    from mlflow import MlflowClient

    from tunegraph.registry import all_kinds
    from tunegraph.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(workspace, recipe.spec.tracking.mlflow_uri))
    view = collect_run(client, recipe.spec.tracking.experiment or recipe.name, recipe.name, run_ref)
    kinds = all_kinds()
    page = render_html(view, {name: kind.summary_metrics for name, kind in kinds.items()},
                       {name for name, kind in kinds.items() if kind.produces == "eval"})
    output = output or workspace / ".tunegraph" / "reports" / f"{view.run_name}.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    return output
