"""quantize_bnb on the tiny llama: NF4 (double quant) and int8 checkpoints saved, reloaded and checked."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import stage_ctx
from tunegraph.errors import StageError

LINEAR_LAYERS = 2 * 7  # tiny llama: 2 blocks x (q, k, v, o, gate, up, down)


def _run(tiny_artifacts, tmp_path, name: str, dataset: bool = False, **params):
    from tunegraph.tasks.quantize_bnb import QuantizeBnbParams, quantize_bnb

    out = tmp_path / name
    out.mkdir()
    inputs = {"model": tiny_artifacts / "model", **({"dataset": tiny_artifacts / "eval"} if dataset else {})}
    return out, quantize_bnb(QuantizeBnbParams(**params), inputs, out, stage_ctx(tmp_path))


def test_nf4_checkpoint_reloads_as_4bit_and_stays_close(tiny_artifacts, tmp_path):
    import bitsandbytes as bnb

    from tunegraph.modelio import load_model, load_tokenizer

    out, result = _run(tiny_artifacts, tmp_path, "nf4", dataset=True, mode="nf4", limit=4)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    reloaded = load_model(out)  # as evaluate would load it
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules()) == LINEAR_LAYERS
    assert load_tokenizer(out).chat_template == load_tokenizer(tiny_artifacts / "model").chat_template
    metrics = result.metrics
    assert metrics["quantized_modules"] == LINEAR_LAYERS
    assert metrics["footprint_mib"] < metrics["source_footprint_mib"]
    assert 0 < metrics["logit_max_rel_error"] < 0.25  # 4-bit weights move the logits a little, not wildly
    assert abs(metrics["ppl_delta_pct"]) < 10


def test_int8_checkpoint_reloads_as_8bit(tiny_artifacts, tmp_path):
    import bitsandbytes as bnb

    from tunegraph.modelio import load_model

    out, result = _run(tiny_artifacts, tmp_path, "int8", mode="int8")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in load_model(out).modules()) == LINEAR_LAYERS
    assert result.metrics["quantized_modules"] == LINEAR_LAYERS
    assert 0 < result.metrics["logit_max_rel_error"] < 0.05  # int8 is finer than 4-bit
    assert "ppl_delta_pct" not in result.metrics  # no eval dataset given


def test_perplexity_limit_fails_the_stage(tiny_artifacts, tmp_path):
    with pytest.raises(StageError, match=r"stage 't': nf4 perplexity .* \(limit 0.0%: max_ppl_delta_pct\)"):
        _run(tiny_artifacts, tmp_path, "strict", dataset=True, mode="nf4", limit=4, max_ppl_delta_pct=0.0)


def test_refuses_quantized_models_and_prompt_style_adapters(tiny_artifacts, tmp_path):
    from tunegraph.tasks.quantize_bnb import QuantizeBnbParams, quantize_bnb

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_artifacts / "model", quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_artifacts / "model", adapter)
    (adapter / "requires_adapter.json").write_text("{}")
    (tmp_path / "out").mkdir()
    for model, message in ((quantized, r"already quantized \(gguf\)"), (adapter, r"prompt-style adapter")):
        with pytest.raises(StageError, match=rf"stage 't': .*{message}"):
            quantize_bnb(QuantizeBnbParams(), {"model": model}, tmp_path / "out", stage_ctx(tmp_path))
