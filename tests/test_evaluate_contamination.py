"""Contamination-aware evaluate: an eval item planted in the training data and flagged by decontaminate is
listed, and the clean metrics are those of evaluating the other items alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import stage_ctx
from tunegraph.chat_data import dataset_file, read_rows, write_rows
from tunegraph.errors import RecipeError, StageError
from tunegraph.recipe import load_recipe
from tunegraph.tasks.decontaminate import DecontaminateParams, decontaminate
from tunegraph.tasks.evaluate import EvaluateParams, evaluate

PLANTED = {"id": "planted-angola", "messages": [
    {"role": "user", "content": "Quiz night! What is the capital of Angola? Answer with only the answer."},
    {"role": "assistant", "content": "Luanda"}]}
# batch size 1: the all-items and the clean-items runs then compute every item exactly alike
PARAMS = EvaluateParams(max_new_tokens=5, batch_size=1, rewards={"toy_rewards:length_parity": 1.0})


def _run(stage_fn, params, inputs: dict, out: Path):
    out.mkdir(parents=True)
    return stage_fn(params, inputs, out, stage_ctx(out.parent, out.name))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def decontaminated(tiny_artifacts, tmp_path_factory) -> Path:
    """A decontaminate stage run on the training rows plus one that asks eval item capital-angola."""
    root = tmp_path_factory.mktemp("decon")
    (root / "train_plus").mkdir()
    write_rows(read_rows(tiny_artifacts / "train") + [PLANTED], dataset_file(root / "train_plus"))
    _run(decontaminate, DecontaminateParams(embedding_threshold=None, max_contamination=0.5),
         {"dataset": root / "train_plus", "eval": tiny_artifacts / "eval"}, root / "decon")
    return root / "decon"


def test_clean_metrics_exclude_the_flagged_item(tiny_artifacts, decontaminated, tmp_path):
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    metrics = _run(evaluate, PARAMS, {**inputs, "contamination": decontaminated}, tmp_path / "aware").metrics
    assert metrics["contaminated_items"] == 1 and metrics["clean_rows"] == 5 and metrics["rows"] == 6

    flagged = _lines(tmp_path / "aware" / "contaminated_items.jsonl")
    assert [item["id"] for item in flagged] == ["capital-angola"]
    assert [(m["train_id"], m["reason"]) for m in flagged[0]["matches"]] == [("planted-angola", "ngram_overlap")]
    predictions = _lines(tmp_path / "aware" / "predictions.jsonl")
    assert [p["id"] for p in predictions if p["contaminated"]] == ["capital-angola"]

    # the clean metrics are exactly those of an evaluation that never saw the flagged item
    (tmp_path / "eval_clean").mkdir()
    clean_rows = [row for row in read_rows(tiny_artifacts / "eval") if row["id"] != "capital-angola"]
    write_rows(clean_rows, dataset_file(tmp_path / "eval_clean"))
    alone = _run(evaluate, PARAMS, {**inputs, "dataset": tmp_path / "eval_clean"}, tmp_path / "alone").metrics
    for key in ("exact_match", "contains_match", "verifiable_accuracy", "reward_mean"):
        assert metrics[f"clean_{key}"] == alone[key], key
    assert metrics["clean_loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert metrics["clean_loss"] != pytest.approx(metrics["loss"], rel=1e-6)  # the flagged item did count in `loss`

    plain = _run(evaluate, PARAMS, inputs, tmp_path / "plain").metrics  # the all-items numbers do not change
    assert {k: v for k, v in metrics.items() if k in plain} == plain
    assert not any(k.startswith("clean_") or k == "contaminated_items" for k in plain)


def test_clean_win_rate_and_flags_in_the_verdicts(tiny_artifacts, decontaminated, tmp_path):
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    _run(evaluate, EvaluateParams(max_new_tokens=3), inputs, tmp_path / "base")
    params = EvaluateParams(max_new_tokens=6, judge={"model": "tiny:llama"}, judge_prefill="[[A]]",
                            judge_sampling={"max_new_tokens": 2})
    metrics = _run(evaluate, params, {**inputs, "baseline": tmp_path / "base", "contamination": decontaminated},
                   tmp_path / "judged").metrics
    assert metrics["clean_judge_compared"] == 5 and metrics["clean_tie_rate"] == 1.0
    verdicts = _lines(tmp_path / "judged" / "pairwise.jsonl")
    assert [v["id"] for v in verdicts if v["contaminated"]] == ["capital-angola"]


def test_contamination_must_come_from_a_decontaminate_of_this_eval_set(tiny_artifacts, decontaminated, tmp_path):
    (tmp_path / "other_eval").mkdir()
    write_rows(read_rows(tiny_artifacts / "eval"), dataset_file(tmp_path / "other_eval"))
    inputs = {"model": tiny_artifacts / "model", "dataset": tmp_path / "other_eval", "contamination": decontaminated}
    with pytest.raises(StageError, match="checked eval set\\(s\\) 'eval', not 'other_eval'; add 'other_eval' to"):
        _run(evaluate, PARAMS, inputs, tmp_path / "a")
    with pytest.raises(StageError, match="'train'.*is not a decontaminate stage's output"):
        _run(evaluate, PARAMS, {**inputs, "contamination": tiny_artifacts / "train"}, tmp_path / "b")


RECIPE = """\
name: aware
base_model: tiny:llama
stages:
  base: {uses: import_model}
  train_data: {uses: load_dataset, params: {path: train.jsonl}}
  eval_data: {uses: load_dataset, params: {path: eval.jsonl}}
  clean_data:
    uses: decontaminate
    inputs: {dataset: train_data, eval: eval_data}
  eval_base:
    uses: evaluate
    inputs: {model: base, dataset: eval_data, contamination: CONTAMINATION}
"""


def test_recipe_accepts_a_decontaminate_stage_as_contamination(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("CONTAMINATION", "clean_data"))
    assert load_recipe(path).stages["eval_base"].spec.inputs["contamination"] == "clean_data"
    path.write_text(RECIPE.replace("CONTAMINATION", "eval_self").replace(
        "  eval_base:", "  eval_self: {uses: evaluate, inputs: {model: base, dataset: eval_data}}\n  eval_base:"))
    with pytest.raises(RecipeError, match="input 'contamination' takes a dataset"):
        load_recipe(path)
