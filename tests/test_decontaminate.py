"""Decontamination: planted benchmark leaks (verbatim inside a longer prompt, paraphrased) are removed and
reported with the eval item they match; clean rows and rows sharing only a prompt template are kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import stage_ctx
from tunegraph.chat_data import read_rows, write_rows
from tunegraph.data.decontaminate import NgramSettings, embedding_leaks, ngram_leaks
from tunegraph.data.embedder import Embedder
from tunegraph.errors import StageError
from tunegraph.tasks.decontaminate import REPORT_FILE, DecontaminateParams, decontaminate, eval_sets


def row(row_id: str, prompt: str, answer: str) -> dict:
    return {"id": row_id, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


EVAL = [
    row("gsm-1", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?", "72"),
    row("gsm-2", "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?", "10"),
    row("trivia-1", "Which planet in our solar system has the most moons?", "Saturn"),
    row("short-1", "Who wrote the novel Pride and Prejudice in 1813?", "Jane Austen"),
]

CLEAN = [
    row("clean-1", "Write a haiku about autumn leaves falling in a quiet park.",
        "Red leaves drift and fall / the bench waits in the cold light / footsteps fade away"),
    row("clean-2", "Explain what a prime number is to a child.",
        "A prime number is a number bigger than one that you can only share out evenly as one group or as "
        "groups of one, like 2, 3, 5 and 7."),
    row("clean-3", "Tom has 3 apples and buys 5 more at the market. How many apples does he have now?", "8"),
    row("clean-4", "List three uses of copper in everyday life.", "Electrical wiring, water pipes and coins."),
]

VERBATIM = row("leak-verbatim", "Here is a tricky one from my homework, please help. Natalia sold clips to 48 of her "
                                "friends in April, and then she sold half as many clips in May. How many clips did "
                                "Natalia sell altogether? Show every step.", "She sold 48 + 24 = 72 clips.")
SHORT_WHOLE = row("leak-short", "Quick quiz: who wrote the novel Pride and Prejudice in 1813? One line please.",
                  "Jane Austen wrote it.")
PARAPHRASE = row("leak-paraphrase", "Weng makes 12 dollars an hour babysitting. Yesterday she did just 50 minutes of "
                                    "babysitting. How much money did she earn?", "She earned 10 dollars.")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


# --------------------------------------------------------------------------- n-grams


def test_a_question_leaked_inside_a_longer_prompt_is_found_with_its_eval_item():
    leaks = ngram_leaks(CLEAN + [VERBATIM], "gsm", EVAL)
    assert [(leak.id, leak.reason, leak.eval_set, leak.eval_id) for leak in leaks] == \
        [("leak-verbatim", "ngram_overlap", "gsm", "gsm-1")]
    assert leaks[0].score >= 5 and "natalia sold clips to 48" in leaks[0].detail


def test_short_eval_questions_match_whole_but_shorter_ones_do_not():
    assert [leak.eval_id for leak in ngram_leaks([SHORT_WHOLE], "e", EVAL)] == ["short-1"]  # 9 words >= min_words 8
    mentions_saturn = row("saturn", "Which planet in our solar system has rings?", "Saturn has the brightest rings.")
    assert ngram_leaks([mentions_saturn], "e", EVAL) == []
    strict = NgramSettings(min_words=10)
    assert ngram_leaks([SHORT_WHOLE], "e", EVAL, strict) == []


def test_n_is_configurable():
    partial = row("partial", "A puzzle: Natalia sold clips to 48 of her friends. What happened next?", "Unknown.")
    assert ngram_leaks([partial], "e", EVAL) == []                       # shares only 8 consecutive words
    assert [leak.id for leak in ngram_leaks([partial], "e", EVAL, NgramSettings(n=8))] == ["partial"]
    assert ngram_leaks([partial], "e", EVAL, NgramSettings(n=8, min_matches=2)) == []


def test_a_prompt_template_shared_by_eval_items_is_not_a_leak():
    template = "Read the passage below and answer the question that follows it with a single word only.\n\n"
    evals = [row(f"t{i}", template + passage, answer) for i, (passage, answer) in
             enumerate([("The river froze early that winter.", "froze"), ("Bees carried pollen home.", "bees")])]
    training = row("same-template", template + "The market sold fresh bread every morning.", "bread")
    assert ngram_leaks([training], "e", evals) == []
    leaked = row("leaked", template + "The river froze early that winter.", "froze")
    assert [leak.eval_id for leak in ngram_leaks([leaked], "e", evals)] == ["t0"]
    assert len(ngram_leaks([training], "e", evals, NgramSettings(boilerplate_items=None))) == 1


def test_leaks_in_the_answer_or_the_rejected_reply_count():
    in_answer = row("in-answer", "Tell me a story.", "Once upon a time: Natalia sold clips to 48 of her friends in "
                                                     "April, and then she sold half as many clips in May.")
    in_rejected = row("in-rejected", "Tell me a story.", "A short story.") | {
        "rejected": "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."}
    assert [leak.id for leak in ngram_leaks([in_answer, in_rejected], "e", EVAL)] == ["in-answer", "in-rejected"]


# --------------------------------------------------------------------------- embeddings


def test_a_paraphrase_is_caught_by_embeddings_and_clean_rows_are_not(embedder):
    assert ngram_leaks([PARAPHRASE], "e", EVAL) == []  # few long n-grams survive the rewording
    leaks = embedding_leaks(CLEAN + [PARAPHRASE], "gsm", EVAL, embedder.embed, threshold=0.9)
    assert [(leak.id, leak.reason, leak.eval_id) for leak in leaks] == \
        [("leak-paraphrase", "embedding_similarity", "gsm-2")]
    assert 0.9 <= leaks[0].score <= 1.0


def test_embeddings_are_unit_length_deterministic_and_match_sentence_transformers(embedder):
    texts = ["How many moons does Saturn have?", "A recipe for bread.", "How many moons does Saturn have?"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[2]) and np.array_equal(Embedder().embed(texts), vectors)
    from sentence_transformers import SentenceTransformer  # the reference implementation of this model

    from tunegraph.data.embedder import model_dir

    reference = SentenceTransformer(str(model_dir()), device="cpu").encode(texts)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


# --------------------------------------------------------------------------- the stage


def make_dataset(root: Path, name: str, rows: list[dict]) -> Path:
    path = root / name
    path.mkdir(parents=True)
    write_rows(rows, path / "data.jsonl")
    return path


def run(tmp_path: Path, training: list[dict], **params):
    data = make_dataset(tmp_path, "train", training)
    evals = make_dataset(tmp_path, "gsm_eval", EVAL)
    out = tmp_path / "out"
    out.mkdir()
    result = decontaminate(DecontaminateParams(**params), {"dataset": data, "eval": evals}, out, stage_ctx(tmp_path))
    return out, result


def test_stage_removes_leaks_keeps_clean_rows_and_reports_each(tmp_path):
    training = CLEAN[:2] + [VERBATIM] + CLEAN[2:] + [PARAPHRASE, SHORT_WHOLE] + [
        row(f"filler-{i}", f"Give me a fun fact number {i} about octopuses.", "They have three hearts.")
        for i in range(40)]
    out, result = run(tmp_path, training, embedding_threshold=0.9, max_contamination=0.1)
    kept = [r["id"] for r in read_rows(out)]
    assert kept == [r["id"] for r in training if not r["id"].startswith("leak-")]
    report = [json.loads(line) for line in (out / REPORT_FILE).read_text().splitlines()]
    assert [(r["id"], r["reason"], r["eval_set"], r["eval_id"]) for r in report] == [
        ("leak-verbatim", "ngram_overlap", "gsm_eval", "gsm-1"), ("leak-short", "ngram_overlap", "gsm_eval", "short-1"),
        ("leak-paraphrase", "embedding_similarity", "gsm_eval", "gsm-2")]
    assert result.metrics["contaminated"] == 3 and result.metrics["eval_items_hit_gsm_eval"] == 3
    card = json.loads((out / "data_card.json").read_text())
    assert card["funnel"]["removed_per_reason"] == {"embedding_similarity": 1, "ngram_overlap": 2}
    assert card["settings"]["eval_sets"] == ["gsm_eval"]


def test_stage_fails_above_max_contamination_naming_the_eval_set_and_counts(tmp_path):
    with pytest.raises(StageError) as info:
        run(tmp_path, CLEAN + [VERBATIM, SHORT_WHOLE], embedding_threshold=None, max_contamination=0.2)
    message = str(info.value)
    assert "2 of 6 rows (33.3%) overlap eval set 'gsm_eval' (2 of its 4 items)" in message
    assert "max_contamination 0.2" in message and "\n" not in message


def test_stage_with_ngrams_only_keeps_the_paraphrase(tmp_path):
    out, result = run(tmp_path, CLEAN + [PARAPHRASE], embedding_threshold=None)
    assert len(read_rows(out)) == 5 and result.metrics["contaminated"] == 0
    assert (out / REPORT_FILE).read_text() == ""


def test_eval_sets_accepts_one_directory_or_several(tmp_path):
    assert eval_sets({"eval": tmp_path / "a"}) == [("a", tmp_path / "a")]
    assert eval_sets({"eval": [tmp_path / "a", tmp_path / "b"]}) == [("a", tmp_path / "a"), ("b", tmp_path / "b")]
    # a list-valued slot (InputSlot(many=True)) maps upstream stage names to directories, in recipe order
    assert eval_sets({"eval": {"gsm": tmp_path / "x", "mmlu": tmp_path / "y"}}) == \
        [("gsm", tmp_path / "x"), ("mmlu", tmp_path / "y")]


def test_several_eval_sets_each_get_counted_and_a_row_is_removed_once(tmp_path):
    """Through a list-valued slot ({stage: directory}); a row leaking into both sets is removed once."""
    both = row("leak-both", VERBATIM["messages"][0]["content"] + " Also: " + EVAL[3]["messages"][0]["content"], "x")
    data = make_dataset(tmp_path, "train", CLEAN + [VERBATIM, SHORT_WHOLE, both])
    evals = {"math": make_dataset(tmp_path, "math", EVAL[:2]), "books": make_dataset(tmp_path, "books", EVAL[3:])}
    out = tmp_path / "out"
    out.mkdir()
    params = DecontaminateParams(embedding_threshold=None, max_contamination=0.5)
    result = decontaminate(params, {"dataset": data, "eval": evals}, out, stage_ctx(tmp_path))
    assert [r["id"] for r in read_rows(out)] == [r["id"] for r in CLEAN]
    report = [(r["id"], r["eval_set"]) for r in map(json.loads, (out / REPORT_FILE).read_text().splitlines())]
    assert report == [("leak-verbatim", "math"), ("leak-both", "math"), ("leak-short", "books"), ("leak-both", "books")]
    assert result.metrics["contaminated_math"] == 2 and result.metrics["contaminated_books"] == 2
    assert result.metrics["contaminated"] == 3
