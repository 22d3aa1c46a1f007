"""MLflow tracking: one parent run per flow run, one nested run per stage.

We use :class:`mlflow.MlflowClient` with explicit run ids rather than the fluent API, so stage
runs in worker threads or subprocesses never depend on a thread-local "active run".
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from tunegraph.context import StepLogger

SECRET_KEY = re.compile(r"(_key$|^key$|token|secret|password|api_key)", re.IGNORECASE)
REDACTED = "***"
_PARAM_BATCH, _METRIC_BATCH, _MAX_PARAM_CHARS = 100, 1000, 6000
# Files of an artifact worth seeing in the MLflow UI (data cards, plots, reports, model cards), at its top
# level and under this size; weights and datasets stay in DVC.
REPORT_SUFFIXES = (".md", ".png", ".svg", ".html")
REPORT_NAMES = ("scores.json", "data_card.json", "contamination.jsonl", "removed.jsonl", "Modelfile")
_MAX_REPORT_BYTES = 5 * 2**20


def report_files(artifact: Path) -> list[Path]:
    """The small human-readable files of an artifact directory, sorted."""
    if not artifact.is_dir():
        return []
    return sorted(p for p in artifact.iterdir()
                  if p.is_file() and (p.suffix in REPORT_SUFFIXES or p.name in REPORT_NAMES)
                  and p.stat().st_size <= _MAX_REPORT_BYTES)


def tracking_uri(workspace: Path, configured: str | None) -> str:
    """$MLFLOW_TRACKING_URI, else the recipe's ``tracking.mlflow_uri``, else sqlite in the workspace."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    db = workspace.resolve() / ".tunegraph" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def flatten_params(value, prefix: str = "") -> dict[str, str]:
    """Nested params as ``a.b.c`` keys; values whose key looks secret are redacted."""
    flat: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            if SECRET_KEY.search(str(key)) and item is not None:
                flat[full] = REDACTED
            else:
                flat.update(flatten_params(item, full))
    elif isinstance(value, (list, tuple)):
        flat[prefix] = str(list(value))[:_MAX_PARAM_CHARS]
    else:
        flat[prefix] = str(value)[:_MAX_PARAM_CHARS]
    return flat


def git_commit(workspace: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=workspace,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """Creates and fills MLflow runs for a recipe's flow and stages."""

    def __init__(self, uri: str, experiment: str, workspace: Path):
        from mlflow import MlflowClient

        self.uri = uri
        self.workspace = workspace
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:"):
                location = (workspace.resolve() / ".tunegraph" / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    @classmethod
    def for_recipe(cls, recipe, workspace: Path) -> "Tracker":
        uri = tracking_uri(workspace, recipe.spec.tracking.mlflow_uri)
        return cls(uri, recipe.spec.tracking.experiment or recipe.name, workspace)

    def start_flow_run(self, recipe, run_name: str, extra_tags: dict[str, str] | None = None) -> str:
        tags = {"tunegraph.recipe": str(recipe.path), "tunegraph.role": "flow",
                "mlflow.source.git.commit": git_commit(self.workspace), **(extra_tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self._log_params(run.info.run_id, flatten_params({
            "recipe": recipe.name, "base_model": recipe.spec.base_model,
            "seed": recipe.spec.seed, "threads": recipe.spec.threads}))
        return run.info.run_id

    def start_stage_run(self, plan, parent_run_id: str | None, runner: str) -> str:
        tags = {
            "tunegraph.role": "stage",
            "tunegraph.stage": plan.name,
            "tunegraph.kind": plan.kind,
            "tunegraph.fingerprint": plan.fingerprint,
            "tunegraph.code_version": plan.code_version,
            "tunegraph.runner": runner,
            "mlflow.source.git.commit": git_commit(self.workspace),
        }
        for slot, up in plan.upstream.items():
            tags[f"tunegraph.upstream.{slot}"] = f"{up['stage']}@{up['content_hash']}"
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=plan.name, tags=tags)
        self._log_params(run.info.run_id, flatten_params({"params": plan.params, "seed": plan.seed,
                                                          "threads": plan.threads}))
        return run.info.run_id

    def step_logger(self, run_id: str) -> StepLogger:
        from mlflow.entities import Metric

        def log(step: int, metrics: dict[str, float]) -> None:
            stamp = _now_ms()
            self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

        return log

    def finish_stage_run(self, run_id: str, outcome=None, status: str = "FINISHED", error: str = "") -> None:
        from mlflow.entities import Metric, RunTag

        if outcome is not None:
            stamp = _now_ms()
            values = {**outcome.metrics, **outcome.timings, "duration_s": outcome.duration_s}
            metrics = [Metric(k, float(v), stamp, 0) for k, v in values.items()]
            for start in range(0, len(metrics), _METRIC_BATCH):
                self.client.log_batch(run_id, metrics=metrics[start:start + _METRIC_BATCH])
            self.client.log_batch(run_id, tags=[RunTag("tunegraph.status", outcome.status),
                                                RunTag("tunegraph.content_hash", outcome.content_hash),
                                                RunTag("tunegraph.artifact", str(outcome.path))])
            if outcome.status == "ran":
                for path in report_files(Path(outcome.path)):
                    self.client.log_artifact(run_id, str(path))
        if error:
            self.client.set_tag(run_id, "tunegraph.error", error[:5000])
        self.client.set_terminated(run_id, status=status)

    def register_model(self, run_id: str, recipe, plan, outcome):
        """Put a shippable stage output in the model registry (see :mod:`tunegraph.model_registry`);
        returns the :class:`~tunegraph.model_registry.Registered` version, or None for unregistered stages."""
        from tunegraph.model_registry import register_stage_model

        return register_stage_model(self.client, run_id, recipe, plan, outcome, self.workspace,
                                    git_commit(self.workspace))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[start:start + _PARAM_BATCH])
