"""LLM-judge win rate of evaluate against a baseline eval: verdict parsing, the both-orders rule, counts.

Two judges whose verdicts are known in advance drive the stage end to end:

- the tiny model with its reply prefilled by ``[[A]]``: a judge that always prefers the first answer,
  the extreme of position bias. Judged in one order it would make any model win every item; judged in
  both orders it must give ties only.
- a rule-based judge behind a real OpenAI-compatible HTTP endpoint (the protocol of any hosted judge,
  spoken by the same client a recipe's ``judge: {base_url: ...}`` uses): it reads the two answers out of
  the rendered default prompt and prefers the longer one, and cannot answer about one item. Its
  verdicts follow from the two predictions files, so the expected win / tie / loss counts are computed
  from them independently of the stage; swapped orders, mis-paired answers or a template that does not
  show the answers would all change the counts.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import stage_ctx
from tunegraph.errors import RecipeError, StageError
from tunegraph.recipe import load_recipe
from tunegraph.tasks.evaluate import EvaluateParams, evaluate
from tunegraph.win_rate import Pair, combine_orders, parse_verdict, win_rate_metrics

MALFORMED_ITEM = "Ghana"  # the rule judge cannot decide about the question that names it


def _run(params: EvaluateParams, inputs: dict, out: Path):
    out.mkdir(parents=True)
    return evaluate(params, inputs, out, stage_ctx(out.parent, out.name))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- parsing and the both-orders rule


@pytest.mark.parametrize("reply,prefill,verdict", [
    ("[[A]]", "", "A"), ("Verdict: [[B]] because it is right", "", "B"), ("[[C]]", "", "tie"),
    ("[[tie]]", "", "tie"), ("A]] The first answer is correct.", "[[", "A"), ("B", "[[", "B"),
    (" C]]", "[[", "tie"), ("B.", "", "B"), ("Assistant A", "", "A"),
    ("[[A]] is better than [[B]]", "", None),  # two verdicts: malformed
    ("Apple]]", "[[", None), ("I think the first one is better.", "", None), ("", "[[", None), (None, "[[", None),
    ("a cat", "[[", None),  # a lower-case word is not a verdict
])
def test_parse_verdict(reply, prefill, verdict):
    assert parse_verdict(reply, prefill) == verdict


@pytest.mark.parametrize("model_first,model_second,outcome", [
    ("A", "B", "win"),     # model preferred as A, and again as B
    ("B", "A", "loss"),    # baseline preferred in both positions
    ("A", "A", "tie"),     # always the first position: position bias, not a preference
    ("B", "B", "tie"),     # always the second position
    ("tie", "tie", "tie"),
    ("A", "tie", "tie"),   # inconsistent: MT-Bench's conservative rule makes it a tie
    ("tie", "A", "tie"),
    (None, "B", None), ("A", None, None),  # a malformed reply in either order drops the item
])
def test_combine_orders(model_first, model_second, outcome):
    assert combine_orders(model_first, model_second) == outcome


def test_win_rate_metrics_count_and_drop():
    def pair(reply_ab, reply_ba, answer="long answer", baseline="short"):
        p = Pair("x", "q", answer, baseline, reply_ab, reply_ba, parse_verdict(reply_ab), parse_verdict(reply_ba))
        p.outcome = combine_orders(p.verdict_ab, p.verdict_ba)
        return p

    pairs = [pair("[[A]]", "[[B]]"), pair("[[A]]", "[[B]]"), pair("[[B]]", "[[A]]"), pair("[[A]]", "[[A]]"),
             pair("[[C]]", "[[C]]"), pair("no idea", "[[B]]"), pair(None, "[[A]]")]
    metrics = win_rate_metrics(pairs, unmatched=2)
    assert metrics["judge_compared"] == 5 and metrics["judge_dropped"] == 2 and metrics["judge_unmatched"] == 2
    assert (metrics["win_rate"], metrics["tie_rate"], metrics["loss_rate"]) == (2 / 5, 2 / 5, 1 / 5)
    assert metrics["judge_inconsistent"] == 1  # A/A; C/C is a consistent tie
    assert metrics["judge_malformed"] == 1 and metrics["judge_failed_calls"] == 1
    assert metrics["judge_length_ratio"] == len("long answer") / len("short")
    assert win_rate_metrics([pair("x", "y")])["win_rate"] == 0.0  # nothing compared: rates are 0, not an error


# --------------------------------------------------------------------------- params, fingerprint, refusals


def test_judge_model_and_prompt_are_in_the_fingerprint_transport_is_not():
    base = EvaluateParams(judge={"model": "tiny:llama"})
    assert base.fingerprint_params() == EvaluateParams(judge={"model": "tiny:llama", "timeout_s": 5}).fingerprint_params()
    for other in (EvaluateParams(judge={"model": "embedded:smollm2-135m-instruct"}),
                  EvaluateParams(judge={"model": "tiny:llama"}, judge_prefill=""),
                  EvaluateParams(judge={"model": "tiny:llama"},
                                 judge_template="Q: {{ instruction }}\nA: {{ answer_a }}\nB: {{ answer_b }}\n")):
        assert other.fingerprint_params() != base.fingerprint_params()
    assert "tiny:llama config:" in base.source_identity()
    assert EvaluateParams().source_identity() == ""  # no judge: distilabel upgrades do not re-run evaluations
    with pytest.raises(ValidationError, match="must show both answers; it lacks answer_b"):
        EvaluateParams(judge_template="{{ instruction }} {{ answer_a }}")


def test_a_judge_needs_a_baseline_with_answers(tiny_artifacts, tmp_path):
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    with pytest.raises(StageError, match="a judge \\(win_rate\\) needs a `baseline` input"):
        _run(EvaluateParams(limit=2, judge={"model": "tiny:llama"}), inputs, tmp_path / "no_baseline")
    old = tmp_path / "old_eval"
    old.mkdir()
    (old / "scores.json").write_text('{"exact_match": 0.0}')
    with pytest.raises(StageError, match="baseline eval 'old_eval' has no predictions.jsonl"):
        _run(EvaluateParams(limit=2, judge={"model": "tiny:llama"}), {**inputs, "baseline": old}, tmp_path / "old")


def test_recipe_validation_refuses_a_judge_without_baseline(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""\
name: judged
base_model: tiny:llama
stages:
  base: {uses: import_model}
  eval_data: {uses: load_dataset, params: {path: eval.jsonl}}
  eval_base:
    uses: evaluate
    inputs: {model: base, dataset: eval_data}
    params: {judge: {model: tiny:llama}}
""")
    with pytest.raises(RecipeError, match=r"recipe.yaml:9.*needs a `baseline` input"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("dataset: eval_data}\n    params", "dataset: eval_data, "
                                                 "baseline: eval_plain}\n    params")
                      + "  eval_plain: {uses: evaluate, inputs: {model: base, dataset: eval_data}}\n")
    assert load_recipe(recipe).stages["eval_base"].params.judge.model == "tiny:llama"


# --------------------------------------------------------------------------- the stage, with judges of known verdicts


@pytest.fixture(scope="module")
def answers(tiny_artifacts, tmp_path_factory) -> dict[str, Path]:
    """Evaluations of the tiny model with short (3-token) and long (8-token) answers: baselines to judge against."""
    root = tmp_path_factory.mktemp("answers")
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    for name, tokens in (("short", 3), ("long", 8)):
        _run(EvaluateParams(max_new_tokens=tokens), inputs, root / name)
    return {"short": root / "short", "long": root / "long"}


def test_an_always_first_judge_gives_ties_only(tiny_artifacts, answers, tmp_path):
    """The tiny judge's reply is prefilled with its verdict: [[A]] whatever the answers."""
    params = EvaluateParams(max_new_tokens=8, judge={"model": "tiny:llama"}, judge_prefill="[[A]]",
                            judge_sampling={"max_new_tokens": 3})
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval", "baseline": answers["short"]}
    metrics = _run(params, inputs, tmp_path / "biased").metrics
    assert metrics["judge_compared"] == 6 and metrics["judge_malformed"] == 0
    assert (metrics["win_rate"], metrics["tie_rate"], metrics["loss_rate"]) == (0.0, 1.0, 0.0)
    assert metrics["judge_inconsistent"] == 6
    verdicts = _lines(tmp_path / "biased" / "pairwise.jsonl")
    assert {(v["verdict_ab"], v["verdict_ba"], v["outcome"]) for v in verdicts} == {("A", "A", "tie")}
    model_answers = {p["id"]: p["answer"] for p in _lines(tmp_path / "biased" / "predictions.jsonl")}
    baseline = {p["id"]: p["answer"] for p in _lines(answers["short"] / "predictions.jsonl")}
    assert [(v["answer"], v["baseline_answer"]) for v in verdicts] == [(model_answers[v["id"]], baseline[v["id"]])
                                                                       for v in verdicts]


class _LengthJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint whose judge prefers the longer answer."""

    ANSWER = re.compile(r"\[The Start of Assistant (A|B)'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)
    seen: list[dict] = []

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "length-judge", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        prompt = body["messages"][0]["content"]
        found = dict(self.ANSWER.findall(prompt))
        if MALFORMED_ITEM in prompt:
            reply = "I cannot decide."
        else:  # the reply continues the prefilled "[["
            reply = "A]]" if len(found["A"]) > len(found["B"]) else "B]]" if len(found["A"]) < len(found["B"]) else "C]]"
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def length_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LengthJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"model": "length-judge", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "max_retries": 0}
    server.shutdown()
    server.server_close()


def _expected(model_dir: Path, baseline_dir: Path) -> dict[str, str | None]:
    """Each item's outcome under the longer-answer judge, from the two predictions files alone."""
    baseline = {p["id"]: p["answer"] for p in _lines(baseline_dir / "predictions.jsonl")}
    outcome = {}
    for p in _lines(model_dir / "predictions.jsonl"):
        mine, theirs = len(p["answer"]), len(baseline[p["id"]])
        outcome[p["id"]] = "win" if mine > theirs else "loss" if mine < theirs else "tie"
    return outcome


def test_a_longer_answer_judge_behind_an_endpoint(tiny_artifacts, answers, length_judge, tmp_path):
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    runs = {}
    for name, tokens, baseline in (("long_vs_short", 8, "short"), ("short_vs_long", 3, "long")):
        params = EvaluateParams(max_new_tokens=tokens, judge=length_judge)
        runs[name] = _run(params, {**inputs, "baseline": answers[baseline]}, tmp_path / name).metrics
        verdicts = {v["id"]: v for v in _lines(tmp_path / name / "pairwise.jsonl")}
        expected = _expected(tmp_path / name, answers[baseline])
        ghana = next(i for i, v in verdicts.items() if MALFORMED_ITEM in v["instruction"])
        assert verdicts[ghana]["outcome"] is None and verdicts[ghana]["reply_ab"] == "I cannot decide."
        del expected[ghana]
        assert {i: v["outcome"] for i, v in verdicts.items() if i != ghana} == expected
        metrics = runs[name]
        assert metrics["judge_compared"] == 5 and metrics["judge_dropped"] == 1 and metrics["judge_malformed"] == 2
        for outcome in ("win", "tie", "loss"):
            assert metrics[f"{outcome}_rate"] == sum(o == outcome for o in expected.values()) / 5
        assert metrics["judge_inconsistent"] == 0  # the length judge has no position bias
        lengths = [(len(verdicts[i]["answer"]), len(verdicts[i]["baseline_answer"])) for i in expected]
        assert metrics["judge_length_ratio"] == sum(a for a, _ in lengths) / sum(b for _, b in lengths)
    # greedy answers of 8 tokens extend those of 3, so the long answers win wherever they are longer...
    assert runs["long_vs_short"]["win_rate"] > 0 and runs["long_vs_short"]["loss_rate"] == 0
    # ...and the same comparison from the other side is the mirror image
    assert runs["short_vs_long"]["loss_rate"] == runs["long_vs_short"]["win_rate"]
    assert runs["short_vs_long"]["win_rate"] == runs["long_vs_short"]["loss_rate"]
    assert "delta_win_rate" not in runs["short_vs_long"]  # the baseline itself was not judged
    sent = [b for b in _LengthJudge.seen if b["messages"][-1] == {"role": "assistant", "content": "[["}]
    assert sent and all(b["temperature"] == 0 for b in sent)  # greedy judge, prefilled reply
