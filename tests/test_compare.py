"""`tunegraph compare` reads flow runs back from a real (sqlite) MLflow store."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from rich.console import Console

from tunegraph.compare import differing_params, load_flow_runs, metric_rows, print_comparison
from tunegraph.errors import TunegraphError


def _flow(client, experiment_id, name, lr, loss):
    parent = client.create_run(experiment_id, run_name=name, tags={"tunegraph.role": "flow"})
    for stage, params, metrics in (("data", {"params.path": "a.jsonl"}, {"rows": 10.0}),
                                   ("sft", {"params.learning_rate": lr}, {"train_loss": loss, "duration_s": 3.0})):
        child = client.create_run(experiment_id, run_name=stage, tags={
            "tunegraph.role": "stage", "tunegraph.stage": stage, "mlflow.parentRunId": parent.info.run_id})
        for key, value in params.items():
            client.log_param(child.info.run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(child.info.run_id, key, value)
    return parent.info.run_id


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("demo", artifact_location=(tmp_path / "art").as_uri())
    ids = [_flow(client, experiment_id, f"run{i}", lr, loss)
           for i, (lr, loss) in enumerate((("0.001", 1.5), ("0.002", 1.2), ("0.004", 0.9)))]
    return client, ids


def test_newest_runs_oldest_first_with_differing_params_only(store):
    client, ids = store
    runs = load_flow_runs(client, "demo", [], last=2)
    assert [r.run_id for r in runs] == ids[1:]
    assert differing_params(runs) == [("sft", "params.learning_rate", ["0.002", "0.004"])]
    rows = {(stage, name): values for stage, name, values in metric_rows(runs)}
    assert rows[("sft", "train_loss")] == [1.2, 0.9] and rows[("data", "rows")] == [10.0, 10.0]
    assert ("sft", "duration_s") not in rows  # timings hidden unless asked
    console = Console(record=True, width=200)
    print_comparison(runs, console=console)
    text = console.export_text()
    assert "-0.3" in text and "params.learning_rate" in text


def test_runs_by_id_prefix_and_clear_errors(store):
    client, ids = store
    runs = load_flow_runs(client, "demo", [ids[2][:10], ids[0][:10]], last=2)
    assert [r.run_id for r in runs] == [ids[0], ids[2]]
    with pytest.raises(TunegraphError, match="matches 0 flow runs"):
        load_flow_runs(client, "demo", ["zzzz", ids[0]], last=2)
    with pytest.raises(TunegraphError, match="no MLflow experiment 'nope'"):
        load_flow_runs(client, "nope", [], last=2)
    with pytest.raises(TunegraphError, match="compare needs two or more"):
        load_flow_runs(client, "demo", [], last=1)
