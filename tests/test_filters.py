"""Heuristic rules, diversity selection, and the ``filter`` stage end to end (planted bad rows and duplicates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import stage_ctx
from tunegraph.chat_data import read_rows, write_rows
from tunegraph.data.diversity import kmeans, spread_selection
from tunegraph.data.heuristics import (HeuristicRules, LengthRules, character_counts, heuristic_removals,
                                       repeated_ngram_fraction, word_counts)
from tunegraph.data.removals import REMOVED_FILE
from tunegraph.errors import StageError
from tunegraph.tasks.filter_data import FilterParams, filter_data


def row(row_id: str, prompt: str, *replies: str, **extra) -> dict:
    messages = [{"role": "user", "content": prompt}]
    for index, reply in enumerate(replies):
        if index:
            messages.append({"role": "user", "content": "Go on."})
        messages.append({"role": "assistant", "content": reply})
    return {"id": row_id, "messages": messages, **extra}


GOOD = row("good", "Name three primary colours.", "Red, yellow and blue are the traditional primary colours.")


def reasons(rows, rules=HeuristicRules(), counter=character_counts) -> dict[str, str]:
    return {r.id: r.reason for r in heuristic_removals(rows, rules, counter)}


# --------------------------------------------------------------------------- heuristics


def test_each_rule_removes_its_planted_row_with_its_reason():
    looping = " ".join(["the cat sat on the mat"] * 8)
    rows = [
        GOOD,
        row("empty", "Say something.", " ... !!"),
        row("refusal", "How do I bake bread?", "I\u2019m sorry, but I can\u2019t help with that request."),
        row("ai", "Tell me a joke.", "As an AI language model, I do not have a sense of humour."),
        row("loop", "Describe a cat.", looping),
        row("late-refusal", "Plan a trip.", "Day one: museums.", "I cannot help with that."),
    ]
    assert reasons(rows) == {"empty": "empty_reply", "refusal": "refusal", "ai": "refusal", "loop": "repetitive_reply",
                             "late-refusal": "refusal"}
    detail = {r.id: r.detail for r in heuristic_removals(rows, HeuristicRules(), character_counts)}
    assert "assistant message 2 of 2" in detail["late-refusal"] and "3-grams repeat" in detail["loop"]


def test_length_bounds_in_chars_words_and_tokens():
    counting = " ".join(f"number{i}" for i in range(120))
    rows = [GOOD, row("short", "Capital of France?", "Paris"), row("long", "Count to 120.", counting),
            row("long-prompt", "Please " * 100 + "help.", "Sure, here is some help for you today.")]
    rules = HeuristicRules(length=LengthRules(min_reply=10, max_reply=500, max_prompt=300))
    assert reasons(rows, rules) == {"short": "reply_too_short", "long": "reply_too_long",
                                    "long-prompt": "prompt_too_long"}
    in_words = HeuristicRules(length=LengthRules(unit="words", min_reply=2, max_reply=50),
                              max_repeated_ngram_fraction=None)
    assert reasons(rows, in_words, word_counts) == {"short": "reply_too_short", "long": "reply_too_long"}

    def fake_tokens(texts):  # one "token" per character pair: the rule only sees the counts it is given
        return [len(t) // 2 for t in texts]

    in_tokens = HeuristicRules(length=LengthRules(unit="tokens", min_reply=3), max_repeated_ngram_fraction=None)
    assert reasons(rows, in_tokens, fake_tokens) == {"short": "reply_too_short"}


def test_rules_can_be_switched_off():
    rows = [row("refusal", "q", "I cannot help with that."), row("loop", "q", " ".join(["la la land"] * 10))]
    assert reasons(rows, HeuristicRules(refusal_phrases=(), max_repeated_ngram_fraction=None)) == {}
    assert reasons(rows, HeuristicRules(enabled=False)) == {}


def test_repeated_ngram_fraction():
    assert repeated_ngram_fraction("a b c d e f".split(), 2) == 0.0
    assert repeated_ngram_fraction("a b a b a b".split(), 2) == pytest.approx(1 - 2 / 5)
    assert repeated_ngram_fraction(["a"], 3) == 0.0


def test_normal_prose_with_some_repeated_phrases_is_kept():
    prose = ("To make tea, boil the water, warm the pot, add the tea, pour the water over the tea and wait for "
             "three minutes before you pour the tea into the cup and add milk if you like milk in your tea.")
    assert reasons([row("tea", "How do I make tea?", prose)]) == {}


# --------------------------------------------------------------------------- diversity


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated clusters of sizes 40, 10 and 4 in 8 dimensions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 10
    sizes = (40, 10, 4)
    points = np.concatenate([centre + rng.normal(scale=0.3, size=(size, 8)) for centre, size in zip(centres, sizes)])
    truth = np.repeat(np.arange(3), sizes)
    return points, truth


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    points, truth = blobs()
    first = kmeans(points, 3, seed=4)
    again = kmeans(points, 3, seed=4)
    assert np.array_equal(first.labels, again.labels) and np.array_equal(first.centres, again.centres)
    for cluster in range(3):  # each found cluster is exactly one true cluster
        assert len(set(truth[first.labels == cluster])) == 1
    assert len(set(first.labels)) == 3


def test_spread_selection_keeps_small_clusters_whole_and_thins_big_ones():
    points, truth = blobs()
    chosen = spread_selection(kmeans(points, 3, seed=1), 18)
    assert len(chosen) == 18 and np.all(np.diff(chosen) > 0)
    counts = np.bincount(truth[chosen], minlength=3)
    assert counts[2] == 4 and counts[1] == 7 and counts[0] == 7


def test_selection_larger_than_the_data_keeps_everything():
    points, _ = blobs()
    assert len(spread_selection(kmeans(points, 5, seed=0), 1000)) == len(points)


# --------------------------------------------------------------------------- the stage


def make_dataset(root: Path, rows: list[dict], name: str = "data") -> Path:
    path = root / name
    path.mkdir(parents=True)
    write_rows(rows, path / "data.jsonl")
    return path


TOPICS = ["the water cycle", "volcanoes", "the printing press", "honey bees", "black holes", "the Silk Road",
          "compound interest", "plate tectonics", "jazz music", "the human heart"]


def topic_rows() -> list[dict]:
    rows = []
    for i, topic in enumerate(TOPICS):
        rows.append(row(f"topic-{i}", f"Write two sentences about {topic} for a curious ten year old.",
                        f"Here are two facts about {topic}. People have studied {topic} for a long time, "
                        f"and there is always more to learn about {topic} (fact sheet {i}).", score=float(i % 5)))
    return rows


def test_filter_stage_removes_planted_rows_and_writes_the_report(tmp_path):
    rows = topic_rows()
    planted = [
        row("dup-exact", rows[3]["messages"][0]["content"].upper(), rows[3]["messages"][1]["content"] + " "),
        row("dup-near", rows[5]["messages"][0]["content"],
            rows[5]["messages"][1]["content"].replace("a long time", "a very long time")),
        row("refusal", "Explain tides.", "I'm sorry, but I cannot help with that."),
    ]
    data = make_dataset(tmp_path, rows[:4] + planted[:1] + rows[4:7] + planted[1:] + rows[7:])
    out = tmp_path / "out"
    out.mkdir()
    result = filter_data(FilterParams(), {"dataset": data}, out, stage_ctx(tmp_path))
    kept = read_rows(out)
    assert [r["id"] for r in kept] == [r["id"] for r in rows]          # clean rows kept, in order
    assert kept[0]["score"] == 0.0                                     # extras survive the filter
    removed = [json.loads(line) for line in (out / REMOVED_FILE).read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in removed} == {"refusal": "refusal", "dup-exact": "exact_duplicate",
                                                       "dup-near": "near_duplicate"}
    assert all(set(r) == {"id", "reason", "detail"} and r["detail"] for r in removed)
    assert result.metrics["rows"] == 10 and result.metrics["removed_near_duplicate"] == 1
    card = json.loads((out / "data_card.json").read_text())
    assert [s["step"] for s in card["funnel"]["steps"]] == ["heuristics", "exact_dedup", "near_dedup"]
    assert [s["kept"] for s in card["funnel"]["steps"]] == [12, 11, 10]
    assert (out / "length_histogram.png").is_file() and (out / "score_histogram.png").is_file()


def test_filter_stage_is_byte_reproducible(tmp_path):
    data = make_dataset(tmp_path, topic_rows() + [topic_rows()[0] | {"id": "again"}])
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        filter_data(FilterParams(), {"dataset": data}, tmp_path / name, stage_ctx(tmp_path))
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert outputs[0] == outputs[1]


def test_token_lengths_need_the_model_input(tmp_path):
    data = make_dataset(tmp_path, topic_rows())
    params = FilterParams(heuristics={"length": {"unit": "tokens", "min_reply": 1}})
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match="'tokens' but the stage has no 'model' input"):
        filter_data(params, {"dataset": data}, tmp_path / "out", stage_ctx(tmp_path))


def test_token_lengths_use_the_model_tokenizer(tmp_path, tiny_artifacts):
    rows = topic_rows()
    rows.append(row("tiny", "Say one word.", "Yes"))
    data = make_dataset(tmp_path, rows)
    params = FilterParams(heuristics={"length": {"unit": "tokens", "min_reply": 3}})
    (tmp_path / "out").mkdir()
    filter_data(params, {"dataset": data, "model": tiny_artifacts / "model"}, tmp_path / "out", stage_ctx(tmp_path))
    removed = [json.loads(line) for line in (tmp_path / "out" / REMOVED_FILE).read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in removed] == [("tiny", "reply_too_short")]
    assert "tokens < min_reply 3" in removed[0]["detail"]


def test_diversity_selection_with_minilm_spreads_over_topics(tmp_path):
    """Three topics, one over-represented: selecting 6 rows keeps every topic (the embedder is the real MiniLM)."""
    prompts = {"cooking": ["How long should I boil an egg?", "What is the best way to cook rice?",
                           "How do I make a simple tomato sauce?", "How do I roast vegetables evenly?",
                           "What temperature should I bake bread at?", "How do I fry an egg without sticking?",
                           "How can I make pancakes fluffy?", "How do I cook pasta al dente?"],
               "astronomy": ["Why does the moon have phases?", "What is a black hole?"],
               "tax": ["How are capital gains taxed?", "What is a tax deduction?"]}
    rows = [row(f"{topic}-{i}", prompt, "An answer of reasonable length for this question.")
            for topic, items in prompts.items() for i, prompt in enumerate(items)]
    data = make_dataset(tmp_path, rows)
    params = FilterParams(dedup={"near": False}, diversity={"select": 6, "clusters": 3})
    (tmp_path / "out").mkdir()
    result = filter_data(params, {"dataset": data}, tmp_path / "out", stage_ctx(tmp_path))
    kept = [r["id"] for r in read_rows(tmp_path / "out")]
    assert len(kept) == 6 and result.metrics["removed_not_selected_for_diversity"] == 6
    assert {k.split("-")[0] for k in kept} == {"cooking", "astronomy", "tax"}
    assert sum(k.startswith("cooking") for k in kept) == 2
