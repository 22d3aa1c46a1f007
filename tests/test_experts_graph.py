"""The experts graph of recipes/experts.yaml on the tiny llama, through the runner: SFT and GRPO experts from
one base -> TIES merge -> GGUF Q8_0 -> evaluations of every node; the GGUF export's own card (README.md
beside the .gguf) lists the whole lineage, the merge config, the quantization and every metric."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, make_tiny_workspace
from tunegraph.recipe import load_recipe
from tunegraph.runner import execute_stage

EXPERTS_RECIPE = """\
name: experts
base_model: tiny:llama
seed: 11
threads: 2
stages:
  base: {uses: import_model}
  train_data: {uses: load_dataset, params: {path: train.jsonl}}
  eval_data: {uses: load_dataset, params: {path: eval.jsonl}}
  arith: {uses: load_dataset, params: {path: arith.jsonl}}
  sft:
    uses: sft
    inputs: {model: base, dataset: train_data}
    params: {strategy: lora, lora: {r: 4, alpha: 8}, max_steps: 2, batch_size: 4, learning_rate: 1.0e-2}
  grpo:
    uses: grpo
    inputs: {model: base, dataset: arith}
    params: {strategy: lora, lora: {r: 4, alpha: 8}, rewards: {numeric_match: 1.0}, group_size: 2,
             batch_size: 2, max_steps: 1, max_new_tokens: 3, learning_rate: 1.0e-2, max_length: 64}
  merged:
    uses: merge
    inputs: {models: [sft, grpo], base: base}
    params:
      method: ties
      models: {sft: {weight: 0.7, density: 0.5}, grpo: {weight: 0.3, density: 0.4}}
  eval_base: {uses: evaluate, inputs: {model: base, dataset: eval_data}, params: {max_new_tokens: 2, limit: 2}}
  eval_sft: {uses: evaluate, inputs: {model: sft, dataset: eval_data}, params: {max_new_tokens: 2, limit: 2}}
  eval_grpo:
    uses: evaluate
    inputs: {model: grpo, dataset: arith}
    params: {max_new_tokens: 2, limit: 2, rewards: {numeric_match: 1.0}}
  eval_merged: {uses: evaluate, inputs: {model: merged, dataset: eval_data}, params: {max_new_tokens: 2, limit: 2}}
  gguf:
    uses: export_gguf
    inputs: {model: merged, dataset: eval_data, evals: [eval_base, eval_sft, eval_grpo, eval_merged]}
    # a random tiny model's near-uniform logits make greedy ties likely: report the match rate only
    params: {types: [q8_0], name: tiny, greedy_prompts: 2, max_new_tokens: 4, min_greedy_match: {q8_0: 0.0}}
  card:
    uses: model_card
    inputs: {model: merged, evals: [eval_merged, eval_base]}
"""


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """The workspace after running every stage of EXPERTS_RECIPE through the runner."""
    workspace = make_tiny_workspace(tmp_path_factory.mktemp("experts") / "ws", EXPERTS_RECIPE)
    arith = (REPO / "data/arithmetic/train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]
    (workspace / "arith.jsonl").write_text("".join(arith), encoding="utf-8")
    recipe = load_recipe(workspace / "recipe.yaml")
    outcomes = {name: execute_stage(recipe, workspace, name) for name in recipe.order}
    return workspace, recipe, outcomes


def _manifest(out, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


@pytest.mark.slow  # about 1 min on 2 cores: the fixture runs the 13 stages
def test_gguf_card_lists_experts_merge_quantization_and_metrics(experts):
    workspace, recipe, outcomes = experts
    out = recipe.output_root(workspace)
    assert sorted(p.name for p in (out / "gguf").iterdir()) == [
        "README.md", "gguf_report.json", "lineage.json", "manifest.json", "tiny.q8_0.Modelfile", "tiny.q8_0.gguf"]
    readme = (out / "gguf" / "README.md").read_text()

    # the lineage: both experts, their data, the merge, and the export itself last
    lineage = json.loads((out / "gguf" / "lineage.json").read_text())
    order = [node["stage"] for node in lineage["lineage"]]
    assert sorted(order) == ["arith", "base", "eval_data", "gguf", "grpo", "merged", "sft", "train_data"]
    assert order[-1] == "gguf" and order.index("sft") < order.index("merged") > order.index("grpo")
    assert all(node["status"] == "ok" for node in lineage["lineage"])
    assert [e["stage"] for e in lineage["evals"]] == ["eval_base", "eval_sft", "eval_grpo", "eval_merged"]
    merged_hash = _manifest(out, "merged")["content_hash"]
    assert lineage["lineage"][-1]["manifest"]["upstream"]["model"] == {"stage": "merged", "content_hash": merged_hash}
    for stage, kind in (("sft", "sft"), ("grpo", "grpo"), ("merged", "merge"), ("gguf", "export_gguf")):
        assert f"| `{stage}` | {kind} |" in readme, stage
    assert "| `gguf` | export_gguf | eval | this artifact | dataset: `eval_data`, evals.0: `eval_base`" in readme
    assert f"from `eval_data` (`{_manifest(out, 'eval_data')['content_hash'][:16]}`), `merged` " \
           f"(`{merged_hash[:16]}`)" in readme
    assert "- export-gguf\n" in readme and "- gguf\n" in readme and 'base_model: "tiny:llama"' in readme
    assert "Architecture: model_type llama, num_hidden_layers" in readme  # the source model's
    # data rows and hashes, adapters
    arith = _manifest(out, "arith")
    assert f"| `arith` | load_dataset | 4 | `{arith['files']['data.jsonl']}` |" in readme
    assert readme.count("peft_type=LORA, r=4, lora_alpha=8") == 2  # sft and grpo
    # the TIES merge with its config, as mergekit ran it
    config = (out / "merged" / "mergekit_config.yml").read_text()
    assert "merge_method: ties" in config and "density: 0.4" in config and "weight: 0.7" in config
    assert f"## Merge recipe (stage `merged`)\n\n```yaml\n{config.rstrip()}\n```" in readme

    # Q8_0, the read-back checks (the GGUF node's evaluation) and the evaluate stages' scores
    metrics = json.loads((out / "metrics" / "gguf.json").read_text())
    assert metrics == outcomes["gguf"].metrics and metrics["q8_0_tokenizer_mismatches"] == 0
    assert '- stage `gguf` (export_gguf): `{"format": "gguf", "types": ["q8_0"]}`' in readme
    row = next(line for line in readme.splitlines() if line.startswith("| `tiny.q8_0.gguf` |"))
    assert '{"F32": 5, "Q8_0": 15}' in row and "`eval_data` (4 rows, 2 greedy prompts)" in row
    assert f"| {metrics['q8_0_ppl_delta_pct']:.6g} |" in row and f"| {metrics['q8_0_perplexity']:.6g} |" in row
    assert f"q8_0_ppl_delta_pct={metrics['q8_0_ppl_delta_pct']:.6g}" in readme  # the node's metrics line
    scores = {name: json.loads((out / name / "scores.json").read_text()) for name in ("eval_merged", "eval_grpo")}
    assert f"| `eval_merged` | `merged` (this model, before export) | {scores['eval_merged']['contains_match']:.6g} |" \
        in readme
    assert "| `eval_sft` | `sft` (in the lineage) |" in readme and "| `eval_base` | `base` (in the lineage) |" in readme
    assert f"{scores['eval_grpo']['verifiable_accuracy']:.6g}" in readme.split("| `eval_grpo` |")[1].splitlines()[0]
    assert str(workspace) not in readme + json.dumps(lineage)  # no absolute paths

    # the model_card stage's card of the merged safetensors model has the same lineage (without the export)
    card = json.loads((out / "card" / "lineage.json").read_text())
    assert [n["stage"] for n in card["lineage"]] == [n for n in order if n not in ("gguf", "eval_data")]


@pytest.mark.slow
def test_gguf_file_reads_back_as_the_merged_model(experts):
    from tunegraph.gguf_verify import load_gguf
    from tunegraph.modelio import load_model, load_tokenizer

    workspace, recipe, _ = experts
    out = recipe.output_root(workspace)
    gguf_model, gguf_tokenizer = load_gguf(out / "gguf" / "tiny.q8_0.gguf")
    merged, tokenizer = load_model(out / "merged"), load_tokenizer(out / "merged")
    ids = tokenizer("7 + 5 = ? Reply with the number only.", return_tensors="pt")["input_ids"]
    assert gguf_tokenizer("7 + 5 = ? Reply with the number only.")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        got, want = gguf_model(input_ids=ids).logits, merged(input_ids=ids).logits
    error = (got - want).abs().max()
    assert 0 < error < 5e-2 * want.abs().max()  # Q8_0-rounded merged weights: close, and not left float


@pytest.mark.slow
def test_gguf_artifact_with_its_card_is_byte_reproducible(experts):
    workspace, recipe, outcomes = experts
    out = recipe.output_root(workspace)
    readme = (out / "gguf" / "README.md").read_bytes()
    again = execute_stage(recipe, workspace, "gguf", force=True)
    assert again.status == "ran" and again.content_hash == outcomes["gguf"].content_hash
    assert (out / "gguf" / "README.md").read_bytes() == readme
