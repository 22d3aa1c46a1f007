"""`tunegraph run` end to end on a tiny model: a real Prefect flow, a real MLflow store, the cache."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from conftest import make_tiny_workspace, run_cli

ALL = {"base", "train_data", "eval_data", "sft", "eval_sft"}


def flow_runs(workspace):
    """[(parent run, {stage: nested run})] for each flow run, oldest first."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / '.tunegraph' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    parents = client.search_runs([experiment.experiment_id], "tags.`tunegraph.role` = 'flow'",
                                 order_by=["attributes.start_time ASC"])
    result = []
    for parent in parents:
        children = client.search_runs([experiment.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        result.append((parent, {c.data.tags["tunegraph.stage"]: c for c in children}))
    return result


def statuses(children) -> dict[str, str]:
    return {name: run.data.tags.get("tunegraph.status") for name, run in children.items()}


@pytest.mark.slow
def test_run_caches_and_reruns_exactly_the_changed_stages(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws")
    first = run_cli(["run", "recipe.yaml"], cwd=ws)
    assert "mlflow ui --backend-store-uri" in first.stdout

    run_cli(["run", "recipe.yaml"], cwd=ws)

    recipe = (ws / "recipe.yaml").read_text()
    (ws / "recipe.yaml").write_text(recipe.replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3"))
    run_cli(["run", "recipe.yaml"], cwd=ws)

    runs = flow_runs(ws)
    assert len(runs) == 3
    assert statuses(runs[0][1]) == {name: "ran" for name in ALL}
    assert statuses(runs[1][1]) == {name: "cached" for name in ALL}
    assert statuses(runs[2][1]) == {"base": "cached", "train_data": "cached", "eval_data": "cached",
                                    "sft": "ran", "eval_sft": "ran"}

    # every nested run carries lineage tags, params and the stage's metrics
    parent, children = runs[0]
    assert parent.info.status == "FINISHED"
    sft = children["sft"]
    assert sft.data.tags["tunegraph.fingerprint"]
    assert sft.data.tags["tunegraph.upstream.model"].startswith("base@")
    assert sft.data.params["params.learning_rate"] == "0.001"
    assert {"train_loss", "steps", "duration_s"} <= set(sft.data.metrics)
    assert "exact_match" in children["eval_sft"].data.metrics
    history = MlflowClient(tracking_uri=f"sqlite:///{ws / '.tunegraph' / 'mlflow.db'}").get_metric_history(
        sft.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1]  # per-step metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / '.tunegraph' / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(children["eval_sft"].info.run_id)}
    assert "scores.json" in logged  # the report files of an artifact reach the MLflow UI

    # `tunegraph compare` puts the last two flow runs side by side, naming the param that changed
    compared = run_cli(["compare", "recipe.yaml"], cwd=ws).stdout
    assert "params that differ" in compared and "params.learning_rate" in compared
    assert "0.001" in compared and "0.002" in compared and "train_loss" in compared


@pytest.mark.slow
def test_only_and_from_select_stages(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws")
    run_cli(["run", "recipe.yaml", "--only", "base", "--only", "train_data", "--only", "eval_data"], cwd=ws)
    produced = sorted(p.name for p in (ws / "data/out/tiny").iterdir() if p.name != "metrics")
    assert produced == ["base", "eval_data", "train_data"]
    missing = run_cli(["run", "recipe.yaml", "--only", "eval_sft"], cwd=ws, check=False)
    assert missing.returncode == 2
    assert "needs the output of stage 'sft'" in missing.stderr.strip().splitlines()[-1]
    run_cli(["run", "recipe.yaml", "--from", "sft", "--force"], cwd=ws)
    runs = flow_runs(ws)
    assert statuses(runs[-1][1]) == {"sft": "ran", "eval_sft": "ran"}


@pytest.mark.slow
def test_bad_data_fails_in_one_line_with_exit_2_and_nothing_half_written(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws")
    lines = (ws / "train.jsonl").read_text().splitlines(keepends=True)
    lines[2] = json.dumps({"instruction": "no output field"}) + "\n"
    (ws / "train.jsonl").write_text("".join(lines))
    result = run_cli(["run", "recipe.yaml", "--parallel", "2"], cwd=ws, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'train_data'") and "train.jsonl:3" in last and "output" in last
    assert "Traceback" not in result.stderr
    out = ws / "data/out/tiny"
    assert not (out / "train_data").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left
