"""The lm_eval stage: lm-evaluation-harness tasks from local files, offline, on the tiny model.

The shipped example tasks (data/lm_eval/) run with the repository as the workspace; the broken task
files are written to a temporary workspace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, stage_ctx
from tunegraph.errors import StageError
from tunegraph.tasks.lm_eval import RESULTS_FILE, SAMPLES_FILE, LmEvalParams, lm_eval

SHIPPED = ["data/lm_eval/facts_mc.yaml", "data/lm_eval/arithmetic_gen.yaml"]
UNREACHABLE = "http://127.0.0.1:9"  # any attempt to reach the hub fails at once


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow  # two harness runs: ~35 s on 2 idle cores, a minute on a busy machine
def test_shipped_tasks_run_offline_and_reproduce(tiny_artifacts, tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, UNREACHABLE)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    params = LmEvalParams(tasks=SHIPPED, limit=6, batch_size=4)
    outs = [tmp_path / "first", tmp_path / "second"]
    results = []
    for out in outs:
        out.mkdir()
        results.append(lm_eval(params, {"model": tiny_artifacts / "model"}, out, stage_ctx(REPO, "lm")))

    metrics = results[0].metrics
    assert results[1].metrics == metrics
    assert _files(outs[0]) == _files(outs[1])  # byte-identical artifacts
    assert {"tunegraph_facts.acc", "tunegraph_facts.acc_norm",
            "tunegraph_arithmetic.exact_match.number"} <= set(metrics)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())

    # The metrics are lm-eval's own numbers, and the mean of its per-document scores.
    report = json.loads((outs[0] / RESULTS_FILE).read_text(encoding="utf-8"))
    assert metrics["tunegraph_facts.acc"] == report["results"]["tunegraph_facts"]["acc,none"]
    arithmetic = report["results"]["tunegraph_arithmetic"]
    assert metrics["tunegraph_arithmetic.exact_match.number"] == arithmetic["exact_match,number"]
    samples = [json.loads(line) for line in (outs[0] / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()]
    facts = [s["acc"] for s in samples if s["task"] == "tunegraph_facts"]
    assert len(facts) == 6 and metrics["tunegraph_facts.acc"] == pytest.approx(sum(facts) / len(facts))
    assert report["n-samples"]["tunegraph_facts"]["effective"] == 6
    # No machine, path or clock in the artifact; the config keeps the data file as the task file names it.
    text = (outs[0] / RESULTS_FILE).read_text(encoding="utf-8")
    for leak in (str(REPO), str(tmp_path), "date", "total_evaluation_time", "pretty_env_info", "git_hash"):
        assert leak not in text
    kwargs = report["configs"]["tunegraph_facts"]["dataset_kwargs"]
    assert kwargs == {"data_files": {"test": "data/lm_eval/facts.jsonl"}}
    assert report["settings"]["seed"] == 5 and report["settings"]["limit"] == 6


def test_task_and_data_files_enter_the_fingerprint():
    params = LmEvalParams(tasks=SHIPPED)
    assert params.input_files() == [*SHIPPED, "data/lm_eval/facts.jsonl", "data/lm_eval/arithmetic.jsonl"]


GOOD = (REPO / "data/lm_eval/facts_mc.yaml").read_text(encoding="utf-8")
BROKEN = {
    "missing.yaml": (None, "file not found"),
    "bad_yaml.yaml": ("task: x\ndataset_path: [json\n", "invalid YAML"),
    "unknown_metric.yaml": (GOOD.replace("metric: acc_norm", "metric: acc_nrom"),
                            "unknown metric 'acc_nrom' (did you mean 'acc_norm'?)"),
    "hub_dataset.yaml": (GOOD.replace("dataset_path: json", "dataset_path: cais/mmlu"), "not a local file loader"),
    "missing_data.yaml": (GOOD.replace("facts.jsonl", "nope.jsonl"),
                          "data file data/lm_eval/nope.jsonl does not exist"),
    "no_task.yaml": (GOOD.replace("task: tunegraph_facts", "name: x"), "no `task:` name"),
    "bad_template.yaml": (GOOD.replace("doc_to_choice: \"{{choices}}\"", "doc_to_choice: \"{{choices\""),
                          "lm-eval cannot build the task"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_task_file_is_a_one_line_error(name, tiny_artifacts, tmp_path):
    text, expected = BROKEN[name]
    workspace = tmp_path / "ws"
    shutil.copytree(REPO / "data/lm_eval", workspace / "data/lm_eval")
    if text is not None:
        (workspace / name).write_text(text, encoding="utf-8")
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError) as caught:
        lm_eval(LmEvalParams(tasks=[name]), {"model": tiny_artifacts / "model"}, tmp_path / "out",
                stage_ctx(workspace, "lm"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"stage 'lm': {name}: ") and expected in message


def test_stage_discovery_does_not_import_lm_eval():
    code = ("import sys; from tunegraph.registry import all_kinds; kinds = all_kinds(); "
            "print('lm_eval' in kinds, sorted(m for m in ('lm_eval', 'datasets', 'evaluate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "True []"
