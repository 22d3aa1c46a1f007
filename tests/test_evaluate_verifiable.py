"""Verifiable accuracy (pass@1, pass@k) and the few-shot baseline in the evaluate stage."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from conftest import stage_ctx
from tunegraph.errors import StageError
from tunegraph.few_shot import few_shot_turns, with_examples
from tunegraph.tasks.evaluate import EvaluateParams, evaluate
from tunegraph.verifiable_eval import pass_at_k


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 4), (4, 4, 2), (7, 1, 7)])
def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12, abs_tol=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_few_shot_turns_are_seeded_solved_examples_after_the_system_message():
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": f"a{i}"}]} for i in range(10)]
    turns = few_shot_turns(rows, 3, seed=4)
    assert turns == few_shot_turns(rows, 3, seed=4) and turns != few_shot_turns(rows, 3, seed=5)
    assert [m["role"] for m in turns] == ["user", "assistant"] * 3
    assert all(m["content"] == "a" + turns[i - 1]["content"][1:] for i, m in enumerate(turns) if i % 2)
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "new"}]
    assert with_examples(conversation, turns) == [conversation[0], *turns, conversation[1]]


def _scores(out):
    return json.loads((out / "scores.json").read_text())


def test_evaluate_reports_pass_at_1_and_pass_at_k(tiny_artifacts, tmp_path):
    params = EvaluateParams(max_new_tokens=5, limit=4, rewards={"toy_rewards:length_parity": 1.0},
                            pass_k=[1, 2, 4], samples=4, temperature=1.0)
    out = tmp_path / "out"
    out.mkdir()
    result = evaluate(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}, out,
                      stage_ctx(tmp_path))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert result.metrics["verifiable_accuracy"] == sum(p["correct"] for p in predictions) / len(predictions)
    assert all(p["correct"] == (len(p["answer"]) % 2 == 0) for p in predictions)
    assert 0 <= result.metrics["pass@1"] <= result.metrics["pass@2"] <= result.metrics["pass@4"] <= 1
    assert _scores(out)["pass@4"] == result.metrics["pass@4"]


def test_evaluate_few_shot_changes_the_prompt_and_needs_examples(tiny_artifacts, tmp_path):
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    with pytest.raises(StageError, match="few_shot=2 needs an `examples` input"):
        evaluate(EvaluateParams(limit=2, few_shot=2), inputs, tmp_path, stage_ctx(tmp_path))
    with pytest.raises(StageError, match="pass_k needs rewards"):
        evaluate(EvaluateParams(limit=2, pass_k=[1], samples=2), inputs, tmp_path, stage_ctx(tmp_path))
    zero, few = tmp_path / "zero", tmp_path / "few"
    zero.mkdir(), few.mkdir()
    evaluate(EvaluateParams(limit=3, max_new_tokens=6), inputs, zero, stage_ctx(tmp_path))
    evaluate(EvaluateParams(limit=3, max_new_tokens=6, few_shot=2), {**inputs, "examples": tiny_artifacts / "train"},
             few, stage_ctx(tmp_path))
    turns = [[json.loads(line)["prompt_turns"] for line in (d / "predictions.jsonl").read_text().splitlines()]
             for d in (zero, few)]
    assert [t + 4 for t in turns[0]] == turns[1]  # two solved examples = four more turns in each prompt
    assert _scores(zero)["loss"] == _scores(few)["loss"]  # the reference loss stays zero-shot
