"""self_instruct, evol_instruct and judge on the tiny model: determinism, counts, resume, judge arithmetic."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import REPO, stage_ctx
from tunegraph.chat_data import read_rows, write_rows
from tunegraph.errors import StageError
from tunegraph.llm_backend import LocalChatBackend
from tunegraph.tasks.evol_instruct import EvolInstructParams, evol_instruct, evolved_instruction
from tunegraph.tasks.judge import (Judge, JudgeCounts, JudgeParams, apply_judge_replies, candidates_of, judge,
                                   kto_rows, preference_pairs, scored_rows)
from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset
from tunegraph.tasks.self_instruct import InstructionPool, SelfInstructParams, clean_instruction, self_instruct

FAST = {"sampling": {"max_new_tokens": 16, "temperature": 1.0},
        "answer_sampling": {"max_new_tokens": 8, "temperature": 1.0}}


def run(stage_fn, params, inputs: dict[str, Path], out: Path, seed: int = 5, checkpoint: Path | None = None):
    out.mkdir(parents=True)
    ctx = replace(stage_ctx(out.parent, out.name), seed=seed, checkpoint_dir=checkpoint)
    return stage_fn(params, inputs, out, ctx)


def user_text(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """The shipped seed instructions, loaded as a dataset artifact (the first stage of the data factory)."""
    out = tmp_path_factory.mktemp("seeds") / "seeds"
    out.mkdir()
    load_dataset(LoadDatasetParams(path=str(REPO / "data/seeds/instructions.jsonl")), {}, out, stage_ctx(out.parent))
    return out


def test_shipped_seeds_are_varied_alpaca_rows(seeds):
    rows = read_rows(seeds)
    assert 30 <= len(rows) <= 60
    assert len({user_text(r) for r in rows}) == len(rows)
    assert sum("Answer with only" in user_text(r) for r in rows) >= 8  # rows with verifiable answers


def test_self_instruct_is_seeded_and_counts_add_up(seeds, tiny_artifacts, tmp_path):
    params = SelfInstructParams(calls_per_round=2, instructions_per_call=2, rounds=2, min_words=1, max_words=400,
                                responses=2, **FAST)
    inputs = {"dataset": seeds, "teacher": tiny_artifacts / "model"}
    result = run(self_instruct, params, inputs, tmp_path / "a")
    again = run(self_instruct, params, inputs, tmp_path / "b")
    other = run(self_instruct, params, inputs, tmp_path / "c", seed=6)
    first = (tmp_path / "a/data.jsonl").read_bytes()
    assert first == (tmp_path / "b/data.jsonl").read_bytes() and result.metrics == again.metrics
    assert first != (tmp_path / "c/data.jsonl").read_bytes() and other.metrics["rows"] > 0
    m = result.metrics
    assert m["instruction_calls"] == 4 and m["new_instructions"] > 0
    assert m["rows"] == m["new_instructions"] * 2 - m["answers_missing"] - m["answers_empty"] - m["answers_duplicate"]
    rows = read_rows(tmp_path / "a")
    seed_texts = {user_text(r) for r in read_rows(seeds)}
    assert len(rows) == m["rows"] and not seed_texts & {user_text(r) for r in rows}
    assert len({r["id"] for r in rows}) == len(rows)


def test_self_instruct_template_must_parse():
    with pytest.raises(ValidationError, match="not a valid Jinja2 template"):
        SelfInstructParams(template="Write {{ num_instructions } queries about {{ input }}")


def test_instruction_cleaning_and_pool():
    assert clean_instruction("  2. \"Describe a rainbow.\" ") == "Describe a rainbow."
    assert clean_instruction("- Name three rivers") == "Name three rivers"
    assert clean_instruction('"1. What is 15% of 80?') == "What is 15% of 80?"  # a quote left open
    assert clean_instruction("What is the plural of 'mouse'?") == "What is the plural of 'mouse'?"
    assert clean_instruction('Describe the sea."') == "Describe the sea."
    pool = InstructionPool(["Name three rivers in Europe."], min_words=3, max_words=12, max_similarity=0.7)
    assert not pool.accept("Name three rivers in Europe!")  # near duplicate of a seed
    assert not pool.accept("Hi there")  # too short
    assert not pool.accept("Here are the queries:")  # a header, not an instruction
    assert pool.accept("Explain why the sky looks blue at noon.")
    assert not pool.accept("Explain why the sky looks blue at noon")  # now in the pool


def test_evol_instruct_rows_lineage_and_mutations(tiny_artifacts, tmp_path):
    params = EvolInstructParams(teacher={"model": str(tiny_artifacts / "model")}, evolutions=2, limit=3,
                                mutations=["CONSTRAINTS", "DEEPENING"], **FAST)
    result = run(evol_instruct, params, {"dataset": tiny_artifacts / "eval"}, tmp_path / "evol")
    m = result.metrics
    rows, originals = read_rows(tmp_path / "evol"), read_rows(tiny_artifacts / "eval")
    assert rows[: len(originals)] == originals  # keep_original: the input rows come first, unchanged
    assert m["rows"] == len(rows) == len(originals) + m["evolved"] - m["answers_missing"] - m["answers_empty"] \
        - m["answers_duplicate"]
    lineages = [json.loads(line) for line in (tmp_path / "evol/evolutions.jsonl").read_text().splitlines()]
    assert [entry["source_id"] for entry in lineages] == [r["id"] for r in originals[:3]]
    for entry in lineages:
        assert set(entry["mutations"]) <= {"CONSTRAINTS", "DEEPENING"}
        assert len(entry["instructions"]) == len(entry["mutations"]) + 1 - ("failed_at" in entry)
    assert m["failed_evolutions"] == sum("failed_at" in entry for entry in lineages)
    assert all("failed_reply" in entry for entry in lineages if "failed_at" in entry)


def test_evol_instruct_refuses_unknown_mutations_and_bad_templates(tiny_artifacts, tmp_path):
    with pytest.raises(ValidationError, match="has no <PROMPT>"):
        EvolInstructParams(templates={"SHORTEN": "Make it shorter."})
    params = EvolInstructParams(teacher={"model": "tiny:llama"}, mutations=["DEEPEN"])
    with pytest.raises(StageError, match="unknown mutation DEEPEN; available: CONSTRAINTS, DEEPENING"):
        run(evol_instruct, params, {"dataset": tiny_artifacts / "eval"}, tmp_path / "bad")


def test_failed_evolutions_follow_the_wizardlm_elimination_rules():
    before = "Name a fruit."
    assert evolved_instruction("#Rewritten Prompt#:\nName a tropical fruit that is yellow.", before) == \
        "Name a tropical fruit that is yellow."
    assert evolved_instruction(None, before) is None
    assert evolved_instruction("  ", before) is None
    assert evolved_instruction("name a  FRUIT.", before) is None  # unchanged
    assert evolved_instruction("Rewrite the given prompt with more detail.", before) is None  # template leak
    assert evolved_instruction("Sorry, I cannot do that.", before) is None  # short refusal


def test_resume_after_a_crash_reuses_finished_rows(tiny_artifacts, tmp_path, monkeypatch):
    params = EvolInstructParams(teacher={"model": str(tiny_artifacts / "model"), "batch_size": 2}, limit=4,
                                responses=2, **FAST)
    inputs = {"dataset": tiny_artifacts / "eval"}
    uninterrupted = run(evol_instruct, params, inputs, tmp_path / "whole")
    checkpoint = tmp_path / "checkpoint"
    real_chat, calls = LocalChatBackend.chat, []

    def crash_on_third_batch(self, conversations, sampling, seeds):
        # Stands in for the process being killed mid-stage (a real kill cannot be scripted portably here).
        calls.append(len(conversations))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_chat(self, conversations, sampling, seeds)

    monkeypatch.setattr(LocalChatBackend, "chat", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(evol_instruct, params, inputs, tmp_path / "crashed", checkpoint=checkpoint)
    monkeypatch.setattr(LocalChatBackend, "chat", real_chat)
    assert len((checkpoint / "replies.jsonl").read_text().splitlines()) == 4  # two finished batches of two
    resumed = run(evol_instruct, params, inputs, tmp_path / "resumed", checkpoint=checkpoint)
    assert resumed.timings["requests_resumed"] == 4
    assert resumed.timings["requests_sent"] == uninterrupted.timings["requests_sent"] - 4
    assert (tmp_path / "resumed/data.jsonl").read_bytes() == (tmp_path / "whole/data.jsonl").read_bytes()
    assert resumed.metrics == uninterrupted.metrics


def test_judge_counts_malformed_replies_and_explains_an_empty_result(tiny_artifacts, tmp_path):
    """The tiny model never writes a score: every reply is malformed, counted, and the stage says so."""
    params = JudgeParams(judge={"model": "tiny:llama"}, sampling={"max_new_tokens": 6, "temperature": 1.0})
    with pytest.raises(StageError, match=r"produced no rows \(rows_in=6, judged=6, malformed=6"):
        run(judge, params, {"dataset": tiny_artifacts / "eval"}, tmp_path / "judged")


def scored_dataset(directory: Path, scores: list[tuple[str, str, float | None]]) -> Path:
    rows = []
    for prompt, reply, score in scores:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        rows.append({"id": f"{prompt}|{reply}", "messages": messages, **({"score": score} if score is not None else {})})
    directory.mkdir(parents=True)
    write_rows(rows, directory / "data.jsonl")
    return directory


SCORED = [("Add 2 and 2.", "4", 9.0), ("Add 2 and 2.", "22", 2.0), ("Add 2 and 2.", "four", 8.0),
          ("Name a colour.", "blue", 6.0), ("Name a colour.", "Blue.", 6.5), ("Say hi.", "hi", 7.0)]


def test_judge_pairs_and_kto_from_upstream_scores_without_a_model(tmp_path):
    """Rows scored by an earlier judge stage are not judged again: no judge model is needed here."""
    data = scored_dataset(tmp_path / "scored", SCORED)
    result = run(judge, JudgeParams(mode="pairs", min_gap=1.0), {"dataset": data}, tmp_path / "pairs")
    pairs = read_rows(tmp_path / "pairs")
    assert [(user_text(r), r["messages"][-1]["content"], r["rejected"]) for r in pairs] == [("Add 2 and 2.", "4", "22")]
    assert result.metrics["prompts_small_gap"] == 1 and result.metrics["prompts_single_reply"] == 1
    assert result.metrics["reused_scores"] == 6 and result.metrics["judged"] == 0
    result = run(judge, JudgeParams(mode="kto", kto_threshold=7.0), {"dataset": data}, tmp_path / "kto")
    labels = [(r["messages"][-1]["content"], r["label"]) for r in read_rows(tmp_path / "kto")]
    assert labels == [("4", True), ("22", False), ("four", True), ("blue", False), ("Blue.", False), ("hi", True)]
    assert result.metrics["desirable"] == 3


def test_judge_replies_parse_drop_and_count(tmp_path):
    rows = read_rows(scored_dataset(tmp_path / "plain", [(p, r, None) for p, r, _ in SCORED]))
    judge_prompt = Judge(JudgeParams())
    candidates = candidates_of(rows, "score", reuse_scores=True)
    counts = JudgeCounts()
    replies = [" 9\nCorrect.", " 2", " nine", None, "Score: 11", " 7/10"]
    apply_judge_replies(judge_prompt, list(candidates.values()), replies, counts)
    assert (counts.malformed, counts.failed_calls) == (2, 1)  # "nine" and 11 are malformed; None failed
    kept, below = scored_rows(rows, candidates, min_score=5.0)
    assert [(r["messages"][-1]["content"], r["score"]) for r in kept] == [("4", 9.0), ("hi", 7.0)]
    assert below == 1  # "22" scored 2
    pairs, counts = preference_pairs(candidates, min_gap=3.0)
    assert [(r["messages"][-1]["content"], r["rejected"]) for r in pairs] == [("4", "22")]
    labelled, tally = kto_rows(rows, candidates, threshold=7.0)
    assert tally == {"desirable": 2, "undesirable": 1}


def test_judge_prompts_render_and_ultrafeedback_parses():
    rubric = Judge(JudgeParams(rubric="10: perfect."))
    conversation = rubric.conversation("Add 2 and 2.", "4")
    assert "10: perfect." in conversation[0]["content"] and "Add 2 and 2." in conversation[0]["content"]
    assert conversation[-1] == {"role": "assistant", "content": "Score:"}
    feedback = Judge(JudgeParams(prompt="ultrafeedback"))
    assert feedback.conversation("Add 2 and 2.", "4")[0]["role"] == "system"
    assert feedback.score("Add 2 and 2.", "4", "#### Output for Text 1\nRating: 4\nRationale: right.") == 4.0
    assert feedback.score("Add 2 and 2.", "4", "I think it is good.") is None
    assert feedback.score("Add 2 and 2.", "4", "#### Output for Text 1\nRating: good\nRationale: right.") is None
    with pytest.raises(ValidationError, match="Jinja2"):
        JudgeParams(template="{{ response ")


def test_data_factory_recipe_validates():
    from tunegraph.recipe import load_recipe
    from tunegraph.registry import all_kinds

    missing = {"filter", "decontaminate"} - set(all_kinds())
    if missing:
        pytest.skip(f"stage kinds {sorted(missing)} are not registered yet")
    recipe = load_recipe(REPO / "recipes/data_factory.yaml")
    assert [recipe.stages[n].kind.name for n in ("self_instruct", "evol_instruct", "judge", "pairs", "sft")] == \
        ["self_instruct", "evol_instruct", "judge", "judge", "sft"]
