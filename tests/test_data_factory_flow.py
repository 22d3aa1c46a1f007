"""The data factory as a real `tunegraph run` flow on the tiny model, then again against `tunegraph serve`.

seeds -> self_instruct -> evol_instruct -> judge -> filter -> decontaminate -> judge (pairs), and sft,
with a planted duplicate and a planted benchmark leak among the seeds. The second run, in a copy of
the workspace, adds only ``base_url`` to each teacher and judge setting: the LLM stages run again and
must write byte-identical datasets, so every stage downstream of them is cached.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_serve import serving
from tunegraph.chat_data import read_rows

EVAL_LINES = 4
LEAK = 1  # index of the eval item planted among the seeds (10 words: a whole short eval text matches)

# The tiny model is random: it never writes a number, so the judge's prefill carries the score (every
# reply scores 5) and `pairs` takes min_gap 0 (first vs last reply of a prompt). The judge is still asked,
# so its replies (judgements.jsonl) are compared local against served like every other generation.
RECIPE = """\
name: factory
base_model: tiny:llama
seed: 7
threads: 2
stages:
  base:
    uses: import_model
  seeds:
    uses: load_dataset
    params: {path: seeds.jsonl}
  eval_data:
    uses: load_dataset
    params: {path: eval.jsonl}
  self_instruct:
    uses: self_instruct
    inputs: {dataset: seeds}
    params:
      teacher: {model: tiny:llama, batch_size: 4}
      calls_per_round: 2
      instructions_per_call: 2
      min_words: 1
      max_words: 400
      include_seeds: true
      responses: 2
      sampling: {max_new_tokens: 24, temperature: 1.0}
      answer_sampling: {max_new_tokens: 8, temperature: 1.0}
  evol_instruct:
    uses: evol_instruct
    inputs: {dataset: self_instruct}
    params:
      teacher: {model: tiny:llama, batch_size: 4}
      limit: 2
      responses: 2
      sampling: {max_new_tokens: 16, temperature: 1.0}
      answer_sampling: {max_new_tokens: 8, temperature: 1.0}
  judge:
    uses: judge
    inputs: {dataset: evol_instruct}
    params:
      judge: {model: tiny:llama, batch_size: 4}
      prefill: "Score: 5"
      sampling: {max_new_tokens: 4, temperature: 1.0}
  filter:
    uses: filter
    inputs: {dataset: judge}
  decontaminate:
    uses: decontaminate
    inputs: {dataset: filter, eval: eval_data}
    params: {max_contamination: 0.2}
  pairs:
    uses: judge
    inputs: {dataset: decontaminate}
    params:
      judge: {model: tiny:llama, batch_size: 4}
      mode: pairs
      min_gap: 0
  sft:
    uses: sft
    inputs: {model: base, dataset: decontaminate}
    params: {strategy: lora, max_steps: 2, batch_size: 4, learning_rate: 1.0e-3}
"""
LLM_STAGES = ("self_instruct", "evol_instruct", "judge", "pairs")
DATA_STAGES = ("self_instruct", "evol_instruct", "judge", "filter", "decontaminate", "pairs")
GENERATED = ("self_instruct/data.jsonl", "evol_instruct/data.jsonl", "evol_instruct/evolutions.jsonl",
             "judge/data.jsonl", "judge/judgements.jsonl", "filter/data.jsonl", "filter/removed.jsonl",
             "decontaminate/data.jsonl", "decontaminate/contamination.jsonl", "pairs/data.jsonl")


def factory_workspace(root: Path) -> Path:
    """6 shipped seeds plus a duplicate of one and a copy of an eval item; 4 eval items; the recipe."""
    root.mkdir(parents=True)
    seeds = [json.loads(line) for line in (REPO / "data/seeds/instructions.jsonl").read_text().splitlines()[:6]]
    evals = [json.loads(line) for line in (REPO / "data/quickstart/eval.jsonl").read_text().splitlines()[:EVAL_LINES]]
    leaked = evals[LEAK]["messages"]
    seeds.append({**seeds[0], "id": "planted-duplicate"})
    seeds.append({"id": "planted-leak", "instruction": leaked[0]["content"], "output": leaked[1]["content"]})
    (root / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds), encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals), encoding="utf-8")
    (root / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    return root


def served_recipe(base_url: str) -> str:
    """The recipe with ``base_url`` added to each teacher/judge setting, and no other change."""
    recipe = re.sub(r"(\{model: tiny:llama), ", rf"\1, base_url: {base_url}, ", RECIPE)
    assert recipe.count(f"base_url: {base_url}") == len(LLM_STAGES)
    return recipe


def statuses(table: str) -> dict[str, str]:
    """{stage: status} from the summary table `tunegraph run` prints."""
    rows = re.findall(r"^\W+(\w+)\s+\W\s+\w+\s+\W\s+(\w+)\s", table, re.MULTILINE)
    return {stage: status for stage, status in rows if stage != "stage"}  # not the header


def metrics(ws: Path, stage: str) -> dict[str, float]:
    return json.loads((ws / "data/out/factory/metrics" / f"{stage}.json").read_text())


def manifest(ws: Path, stage: str) -> dict:
    return json.loads((ws / "data/out/factory" / stage / "manifest.json").read_text())


@pytest.mark.slow
def test_data_factory_runs_as_a_flow_and_gives_the_same_data_served(tmp_path):
    local = factory_workspace(tmp_path / "local")
    table = run_cli(["run", "recipe.yaml"], cwd=local).stdout
    assert statuses(table) == {stage: "ran" for stage in ("base", "seeds", "eval_data", *DATA_STAGES, "sft")}, table
    out = local / "data/out/factory"

    # the funnel: each stage's rows are the next stage's input, less what it removed
    m = {stage: metrics(local, stage) for stage in DATA_STAGES}
    counts = {stage: len(read_rows(out / stage)) for stage in DATA_STAGES}
    assert {stage: m[stage]["rows"] for stage in DATA_STAGES} == counts
    assert m["self_instruct"]["new_instructions"] > 0 and counts["self_instruct"] > 8  # new rows + the 8 seeds
    assert m["evol_instruct"]["evolved"] > 0 and counts["evol_instruct"] > counts["self_instruct"]
    assert counts["judge"] == counts["evol_instruct"]
    assert m["judge"]["judged"] == counts["judge"] - 1  # the planted duplicate is judged once, with its original
    assert m["judge"]["mean_score"] == 5.0 and m["judge"]["malformed"] == 0
    removed = [json.loads(line) for line in (out / "filter/removed.jsonl").read_text().splitlines()]
    assert "planted-duplicate" in {r["id"] for r in removed}
    assert counts["filter"] == counts["judge"] - len(removed)
    assert "planted-leak" in {r["id"] for r in read_rows(out / "filter")}
    leaks = [json.loads(line) for line in (out / "decontaminate/contamination.jsonl").read_text().splitlines()]
    assert [leak["id"] for leak in leaks] == ["planted-leak"]
    clean = read_rows(out / "decontaminate")
    assert counts["decontaminate"] == counts["filter"] - 1
    assert "planted-leak" not in {r["id"] for r in clean} and "seed-arith-add" in {r["id"] for r in clean}

    # pairs: the scores from `judge` are reused (nothing judged twice); chosen and rejected answer one prompt
    assert m["pairs"]["judged"] == 0 and m["pairs"]["reused_scores"] > 0
    pairs = read_rows(out / "pairs")
    assert pairs and all(p["messages"][-1]["content"] != p["rejected"] for p in pairs)
    clean_prompts = {json.dumps(r["messages"][:-1]) for r in clean}
    assert all(json.dumps(p["messages"][:-1]) in clean_prompts for p in pairs)

    # sft trained on the cleaned rows
    assert manifest(local, "sft")["upstream"]["dataset"]["content_hash"] == manifest(local, "decontaminate")["content_hash"]
    assert metrics(local, "sft")["steps"] == 2

    # the same recipe against `tunegraph serve tiny:llama`, with base_url added and nothing else, in a
    # copy of the workspace (its own MLflow store): the LLM stages run again, with new fingerprints; if
    # they write the same bytes, everything downstream of them is cached
    served = tmp_path / "served"
    shutil.copytree(local, served, ignore=shutil.ignore_patterns(".tunegraph"))
    with serving("tiny:llama", tmp_path) as base_url:
        (served / "recipe.yaml").write_text(served_recipe(base_url), encoding="utf-8")
        table = run_cli(["run", "recipe.yaml"], cwd=served).stdout
    assert statuses(table) == {"base": "cached", "seeds": "cached", "eval_data": "cached", "self_instruct": "ran",
                               "evol_instruct": "ran", "judge": "ran", "filter": "cached", "decontaminate": "cached",
                               "pairs": "ran", "sft": "cached"}, table
    for stage in LLM_STAGES:
        assert manifest(served, stage)["fingerprint"] != manifest(local, stage)["fingerprint"]
    for name in GENERATED:
        assert (served / "data/out/factory" / name).read_bytes() == (out / name).read_bytes(), name
