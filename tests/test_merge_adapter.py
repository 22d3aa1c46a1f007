"""The ``merge_adapter`` stage: LoRA and QLoRA adapters merged into a float32 base, weights checked
against W0 + (alpha/r) B A by hand, logits against the adapter model; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_workspace, stage_ctx
from tunegraph.errors import StageError
from tunegraph.models import model_files
from tunegraph.tasks.merge_adapter import MergeAdapterParams, merge_adapter
from tunegraph.training.strategies import (LoraSettings, QLoraSettings, StrategySettings, apply_strategy, load_base,
                                           save_adapter, save_trained_model)

LORA = LoraSettings(r=4, alpha=8)  # scale alpha / r = 2
SCALE = 2.0


def adapter_artifact(base: Path, out: Path, strategy: str) -> Path:
    """A training stage's artifact as far as merging goes: the base's files on top and ``adapter/``, with
    B drawn at random (it starts at zero) so the adapter changes the outputs."""
    settings = StrategySettings(lora=LORA)
    model = apply_strategy(load_base(base, strategy, settings), strategy, settings, model_dir=base)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    out.mkdir(parents=True)
    save_adapter(model, out / "adapter")
    for path in model_files(base):
        shutil.copyfile(path, out / path.name)
    return out


def lora_updates(artifact: Path) -> dict[str, torch.Tensor]:
    """(alpha/r) B A per adapted weight, keyed by the plain model's weight name."""
    tensors = load_file(artifact / "adapter" / "adapter_model.safetensors")
    updates = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            updates[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = SCALE * b @ a
    return updates


def nf4_roundtrip(weight: torch.Tensor, settings: QLoraSettings) -> torch.Tensor:
    """What the 4-bit base stores for ``weight``: quantize to NF4 (double-quantized scales), dequantize."""
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(weight, quant_type=settings.quant_type,
                                                 compress_statistics=settings.double_quant)
    return bnb.functional.dequantize_4bit(packed, state).reshape(weight.shape).float()


def run(params: MergeAdapterParams, base: Path, artifact: Path, out: Path):
    out.mkdir()
    return merge_adapter(params, {"base": base, "adapter": artifact}, out, stage_ctx(out, "merged"))


@pytest.fixture(scope="module")
def base(tiny_artifacts) -> Path:
    return tiny_artifacts / "model"


@pytest.fixture(scope="module")
def lora_artifact(base, tmp_path_factory) -> Path:
    return adapter_artifact(base, tmp_path_factory.mktemp("lora") / "lora", "lora")


@pytest.fixture(scope="module")
def qlora_artifact(base, tmp_path_factory) -> Path:
    return adapter_artifact(base, tmp_path_factory.mktemp("qlora") / "qlora", "qlora")


def test_lora_merge_is_w0_plus_scaled_ba_and_reproduces_the_adapter_model(base, lora_artifact, tmp_path):
    artifact = lora_artifact
    result = run(MergeAdapterParams(), base, artifact, tmp_path / "out")
    w0, merged, updates = load_file(base / "model.safetensors"), load_file(tmp_path / "out/model.safetensors"), \
        lora_updates(artifact)
    assert updates and set(updates) < set(merged)
    for name in merged:
        expected = w0[name] + updates[name] if name in updates else w0[name]
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
    assert result.metrics["max_abs_logit_diff"] <= 1e-4
    report = json.loads((tmp_path / "out/merge_adapter.json").read_text())
    assert report["adapter_trained_on"] == "float" and report["peft_type"] == "LORA"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template  # tokenizer and template came along


def test_qlora_merges_into_the_dequantized_base_it_trained_against(base, qlora_artifact, tmp_path):
    artifact = qlora_artifact
    result = run(MergeAdapterParams(adapter_trained_on="4bit"), base, artifact, tmp_path / "out")
    w0, merged, updates = load_file(base / "model.safetensors"), load_file(tmp_path / "out/model.safetensors"), \
        lora_updates(artifact)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = nf4_roundtrip(w0[name], QLoraSettings()) + updates[name]
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert (merged[name] - (w0[name] + updates[name])).abs().max() > 1e-3  # not the float base: NF4 error is there
    assert torch.equal(merged["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])  # not quantized
    assert result.metrics["max_abs_logit_diff"] <= 1e-4  # merged float model == 4-bit base + adapter


def test_qlora_into_the_original_weights_reports_the_quantization_gap(base, qlora_artifact, tmp_path):
    artifact = qlora_artifact
    params = MergeAdapterParams(adapter_trained_on="4bit", qlora=QLoraSettings(merge_into="original"))
    result = run(params, base, artifact, tmp_path / "out")
    w0, merged, updates = load_file(base / "model.safetensors"), load_file(tmp_path / "out/model.safetensors"), \
        lora_updates(artifact)
    for name, update in updates.items():
        torch.testing.assert_close(merged[name], w0[name] + update, rtol=0, atol=1e-6)
    assert result.metrics["max_abs_logit_diff"] <= 1e-4
    assert result.metrics["logit_diff_vs_4bit"] > 1e-3


def test_a_diff_above_the_tolerance_fails_and_writes_nothing(base, lora_artifact, tmp_path):
    with pytest.raises(StageError, match=r"differ from the adapter model's by up to .* \(tolerance 1e-12\)"):
        run(MergeAdapterParams(tolerance=1e-12), base, lora_artifact, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_prompt_style_and_adapterless_artifacts_are_refused(base, tmp_path):
    from tunegraph.modelio import load_tokenizer

    model = apply_strategy(load_base(base, "prompt_tuning"), "prompt_tuning", StrategySettings())
    save_trained_model(model, load_tokenizer(base), "prompt_tuning", tmp_path / "prompt")
    with pytest.raises(StageError, match="PROMPT_TUNING, a prompt-style adapter"):
        run(MergeAdapterParams(), base, tmp_path / "prompt", tmp_path / "out1")
    with pytest.raises(StageError, match="holds no adapter"):
        run(MergeAdapterParams(), base, base, tmp_path / "out2")


QLORA_RECIPE = """\
name: adapters
base_model: tiny:llama
seed: 11
stages:
  base:
    uses: import_model
  train_data:
    uses: load_dataset
    params: {path: train.jsonl}
  sft:
    uses: sft
    inputs: {model: base, dataset: train_data}
    params: {strategy: qlora, lora: {r: 4, alpha: 8}, max_steps: 1, batch_size: 4, learning_rate: 5.0e-2,
             max_length: 128}
  merged:
    uses: merge_adapter
    inputs: {base: base, adapter: sft}
"""


def test_qlora_adapter_from_the_sft_stage_is_detected_and_merged(tmp_path):
    from tunegraph.recipe import load_recipe
    from tunegraph.runner import execute_stage

    workspace = make_tiny_workspace(tmp_path / "ws", QLORA_RECIPE)
    recipe = load_recipe(workspace / "recipe.yaml")
    for name in recipe.order:
        outcome = execute_stage(recipe, workspace, name)
    report = json.loads((outcome.path / "merge_adapter.json").read_text())
    assert (report["adapter_trained_on"], report["merge_into"]) == ("4bit", "dequantized")  # read from sft's manifest
    assert outcome.metrics["max_abs_logit_diff"] <= 1e-4
    root = workspace / "data/out/adapters"
    base, trained, merged = (load_file(root / n / "model.safetensors") for n in ("base", "sft", "merged"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (trained[name] - base[name]).abs().max() > 1e-2  # one step at a high rate moved the adapter
    for key in merged:  # the same merge the training stage's own export did
        torch.testing.assert_close(merged[key], trained[key], rtol=0, atol=1e-6, msg=key)
