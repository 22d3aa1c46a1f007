"""GGUF export round trip on the tiny llama: write F16 and Q8_0, read back with transformers, compare.

The exact references: an F16 file must give the logits of the source with every matrix rounded to
float16, and a Q8_0 file those of the source with every matrix passed through gguf-py's Q8_0
quantize/dequantize (blocks run along rows, so llama.cpp's q/k row permutation does not change
them). A wrong tensor name, permutation, tied-embedding or hyperparameter shows as a logit error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import stage_ctx
from tunegraph.errors import StageError
from tunegraph.gguf_export import (ChatShape, check_exportable, chat_shape, export_gguf, file_types, modelfile_text,
                                   permute_for_ggml_rope, pre_tokenizer_name, tensor_type)
from tunegraph.gguf_verify import SAMPLE_TEXTS, load_gguf


@pytest.fixture(scope="module")
def exported(tiny_artifacts, tmp_path_factory) -> dict:
    """The tiny model exported as F16 and Q8_0, each loaded back (tokenizer from the F16 file)."""
    out = tmp_path_factory.mktemp("gguf")
    model_dir = tiny_artifacts / "model"
    files = {kind: export_gguf(model_dir, out / f"tiny.{kind}.gguf", kind, name="tiny", stage="export")
             for kind in ("f16", "q8_0")}
    f16_model, tokenizer = load_gguf(files["f16"].path)
    from transformers import AutoModelForCausalLM

    q8_model = AutoModelForCausalLM.from_pretrained(out, gguf_file=files["q8_0"].path.name, dtype=torch.float32)
    return {"files": files, "f16": f16_model, "q8_0": q8_model, "tokenizer": tokenizer, "source": model_dir}


def _source_with_rounded_matrices(model_dir: Path, rounding) -> torch.nn.Module:
    """The source model with every 2-D weight replaced by ``rounding(weight)`` (norms stay float32)."""
    from tunegraph.modelio import load_model

    model = load_model(model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(rounding(parameter))
    return model


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog, 42 times.")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_f16_file_gives_the_source_logits_with_float16_matrices(exported):
    from tunegraph.modelio import load_model, load_tokenizer

    tokenizer = load_tokenizer(exported["source"])
    reference = _source_with_rounded_matrices(exported["source"], lambda w: w.half().float())
    got = _logits(exported["f16"], tokenizer)
    torch.testing.assert_close(got, _logits(reference, tokenizer), rtol=0, atol=1e-6)
    # and float16 rounding is a small change from the float32 source
    source = _logits(load_model(exported["source"]), tokenizer)
    assert (got - source).abs().max() < 1e-2 * source.abs().max()


def test_q8_0_file_gives_the_source_logits_with_q8_0_matrices(exported):
    from tunegraph.modelio import load_model, load_tokenizer

    q8 = gguf.GGMLQuantizationType.Q8_0

    def q8_round_trip(weight: torch.Tensor) -> torch.Tensor:
        array = weight.numpy()
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, q8), q8).reshape(array.shape))

    tokenizer = load_tokenizer(exported["source"])
    got = _logits(exported["q8_0"], tokenizer)
    reference = _logits(_source_with_rounded_matrices(exported["source"], q8_round_trip), tokenizer)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    source = _logits(load_model(exported["source"]), tokenizer)
    error = (got - source).abs().max()
    assert 0 < error < 5e-2 * source.abs().max()  # quantized (not silently left float), and close


def test_tokenizer_and_chat_template_survive_the_round_trip(exported):
    from tunegraph.modelio import load_tokenizer

    source, gguf_tokenizer = load_tokenizer(exported["source"]), exported["tokenizer"]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                    {"role": "assistant", "content": "Lima"}]
    texts = [*SAMPLE_TEXTS, source.apply_chat_template(conversation, tokenize=False)]
    for text in texts:
        assert gguf_tokenizer(text)["input_ids"] == source(text)["input_ids"], text
    assert gguf_tokenizer.chat_template == source.chat_template
    assert gguf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
        source.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(gguf_tokenizer, attribute) == getattr(source, attribute), attribute


def test_metadata_and_tensor_types_follow_llama_cpp(exported):
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    path = str(exported["files"]["q8_0"].path)
    fields, _ = read_gguf_metadata(path)  # string arrays (tokens, merges) come back as their length
    config = json.loads((exported["source"] / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert fields["llama.context_length"] == config["max_position_embeddings"]
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.rope.dimension_count"] == config["head_dim"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eot_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.tokens"] == config["vocab_size"]
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # <|endoftext|>, <|im_start|>, <|im_end|>: control
    types = {tensor.name: gguf.GGMLQuantizationType(tensor.ggml_type).name
             for tensor in GgufHeader.from_file(path).tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd.weight
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert {types[name] for name in types if name.endswith("norm.weight")} == {"F32"}
    assert exported["files"]["f16"].tensor_types == {"F16": 15, "F32": 5}


def test_4bit_types_keep_the_output_projection_at_q8_0_and_odd_rows_at_f16():
    spec = file_types()["q4_0"]
    matrix, odd = np.zeros((64, 64), np.float32), np.zeros((64, 48), np.float32)
    assert tensor_type("blk.0.ffn_up.weight", matrix, spec, has_output=False) == "Q4_0"
    assert tensor_type("token_embd.weight", matrix, spec, has_output=False) == "Q8_0"  # tied: it is the output
    assert tensor_type("token_embd.weight", matrix, spec, has_output=True) == "Q4_0"
    assert tensor_type("output.weight", matrix, spec, has_output=True) == "Q8_0"
    assert tensor_type("blk.0.attn_norm.weight", np.zeros(64, np.float32), spec, has_output=False) == "F32"
    assert tensor_type("blk.0.ffn_down.weight", odd, spec, has_output=False) == "F16"  # 48 % 32 != 0
    assert tensor_type("blk.0.ffn_up.weight", matrix, file_types()["q4_1"], has_output=False) == "Q4_1"
    assert tensor_type("token_embd.weight", matrix, file_types()["q4_1"], has_output=False) == "Q8_0"


def test_export_is_byte_reproducible(tiny_artifacts, tmp_path):
    first, second = (export_gguf(tiny_artifacts / "model", tmp_path / f"{run}.gguf", "q4_1", name="tiny", stage="s")
                     for run in ("a", "b"))
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.tensor_types == {"F32": 5, "Q4_1": 14, "Q8_0": 1}  # the tied embedding is the output: Q8_0


def _rope_hf(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """transformers' rotate-half RoPE on one head: pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
    return x * cos + np.concatenate([-x[half:], x[:half]]) * sin


def _rope_ggml(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """llama.cpp's normal RoPE on one head: pairs (2i, 2i + 1)."""
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * np.cos(angles) - b * np.sin(angles), a * np.sin(angles) + b * np.cos(angles)
    return out


def test_q_k_permutation_turns_rotate_half_rope_into_adjacent_pair_rope():
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 3, 8, 12
    weight, x = rng.normal(size=(n_head * head_dim, hidden)), rng.normal(size=hidden)
    angles = 5.0 / 10000 ** (np.arange(head_dim // 2) * 2 / head_dim)  # position 5
    hf = (weight @ x).reshape(n_head, head_dim)
    ggml = (permute_for_ggml_rope(weight, n_head) @ x).reshape(n_head, head_dim)
    for head in range(n_head):
        rotated_hf, rotated_ggml = _rope_hf(hf[head], angles), _rope_ggml(ggml[head], angles)
        # the same rotated vector, stored (x_0, y_0, x_1, y_1, ...) instead of (x_0, x_1, ..., y_0, y_1, ...)
        np.testing.assert_allclose(rotated_ggml.reshape(-1, 2).T.reshape(-1), rotated_hf, atol=1e-12)


def test_modelfile_translates_the_chatml_template(exported):
    from tunegraph.modelio import load_tokenizer

    tokenizer = load_tokenizer(exported["source"])
    shape = chat_shape(tokenizer)
    assert isinstance(shape, ChatShape)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}]
    assert shape.render(conversation) == tokenizer.apply_chat_template(conversation, tokenize=False,
                                                                       add_generation_prompt=True)
    text, translated = modelfile_text("tiny.q8_0.gguf", tokenizer, exported["files"]["q8_0"].stop_tokens)
    assert translated
    assert "FROM ./tiny.q8_0.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text


def test_modelfile_notes_a_template_it_cannot_translate(exported):
    from tunegraph.modelio import load_tokenizer

    tokenizer = load_tokenizer(exported["source"])
    # Llama-2 style: the system prompt is folded into the first user turn, which no fixed per-role text gives
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}{% elif m['role'] == 'user' %}"
        "[INST] {% if loop.index0 == 1 %}<<SYS>>{{ messages[0]['content'] }}<</SYS>> {% endif %}{{ m['content'] }}"
        " [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    text, translated = modelfile_text("x.gguf", tokenizer, ["</s>"])
    assert not translated and "TEMPLATE" not in text.replace("# TEMPLATE", "")
    assert "#   {% for m in messages %}" in text and 'PARAMETER stop "</s>"' in text


def _model_dir_copy(tiny_artifacts, tmp_path, **config_changes) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_artifacts / "model", target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def test_refuses_other_architectures(tiny_artifacts, tmp_path):
    model_dir = _model_dir_copy(tiny_artifacts, tmp_path, model_type="gpt2")
    with pytest.raises(StageError, match=r"stage 'to_gguf': cannot export model type 'gpt2'"):
        check_exportable(model_dir, "to_gguf")


def test_refuses_prompt_style_adapters_before_loading(tiny_artifacts, tmp_path):
    from tunegraph.tasks.export_gguf import ExportGGUFParams, export_gguf_stage

    model_dir = _model_dir_copy(tiny_artifacts, tmp_path)
    (model_dir / "requires_adapter.json").write_text("{}")
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match=r"stage 't'.*prompt-style adapter"):
        export_gguf_stage(ExportGGUFParams(), {"model": model_dir}, tmp_path / "out", stage_ctx(tmp_path))


def test_pre_tokenizer_names_follow_the_split_rule():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level, "s") == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name(digits, "s") == "smollm"
    with pytest.raises(StageError, match=r"stage 's': .*\['Metaspace'\].*params.tokenizer_pre"):
        pre_tokenizer_name({"type": "Metaspace", "replacement": "_"}, "s")


def _fake_llama_quantize(directory: Path) -> Path:
    """Stands in for llama.cpp's llama-quantize, which is not installed here: it records its arguments
    and copies the input file unchanged, so the stage's side of it (F16 input, output name, reading the
    result back) runs for real."""
    script = directory / "llama-quantize"
    script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args.txt"\ncp "$1" "$2"\n')
    script.chmod(0o755)
    return directory / "args.txt"


def test_q4_k_m_runs_llama_quantize_on_an_f16_file(tiny_artifacts, tmp_path, monkeypatch):
    from tunegraph.tasks.export_gguf import ExportGGUFParams, _write_file

    (tmp_path / "bin").mkdir()
    args_file = _fake_llama_quantize(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    exported = _write_file("q4_k_m", "tiny", tiny_artifacts / "model", tmp_path, stage_ctx(tmp_path),
                           ExportGGUFParams(types=["q4_k_m"]))
    source, target, kind = args_file.read_text().split()
    assert source.endswith(".f16.gguf") and target == str(tmp_path / "tiny.q4_k_m.gguf") and kind == "Q4_K_M"
    assert exported.path == tmp_path / "tiny.q4_k_m.gguf"
    assert exported.tensor_types == {"F16": 15, "F32": 5}  # what the stand-in copied
    assert exported.stop_tokens == ["<|im_end|>"]
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["tiny.q4_k_m.gguf"]  # the F16 input was scratch


def test_q4_k_m_is_skipped_without_llama_quantize(tiny_artifacts, tmp_path, monkeypatch):
    from tunegraph.tasks.export_gguf import ExportGGUFParams, _write_file

    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize there
    assert _write_file("q4_k_m", "tiny", tiny_artifacts / "model", tmp_path, stage_ctx(tmp_path),
                       ExportGGUFParams()) is None
    assert not list(tmp_path.glob("*.gguf"))


def test_stage_writes_verified_files_and_enforces_limits(tiny_artifacts, tmp_path):
    from tunegraph.tasks.export_gguf import REPORT_FILE, ExportGGUFParams, _check_limits, export_gguf_stage

    out = tmp_path / "out"
    out.mkdir()
    # a random tiny model's near-uniform logits make greedy ties likely: report the match rate, don't require it
    params = ExportGGUFParams(types=["q8_0"], name="tiny", greedy_prompts=2, max_new_tokens=4, limit=4,
                              min_greedy_match={"q8_0": 0.0})
    result = export_gguf_stage(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}, out,
                               stage_ctx(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", REPORT_FILE, "lineage.json", "tiny.q8_0.Modelfile",
                                                     "tiny.q8_0.gguf"]
    card = (out / "README.md").read_text()  # the export's own card; its upstream was made without the runner
    assert "| `t` | export_gguf | eval | this artifact | dataset: `eval`, model: `model` | ok |" in card
    assert "| `model` | ? | ? | `?` | - | missing |" in card and "- gguf\n" in card
    assert "from `eval` (`?`), `model` (`?`); the `manifest.json` beside this card holds" in card
    metrics = result.metrics
    assert metrics["q8_0_tokenizer_mismatches"] == 0 and metrics["q8_0_template_translated"] == 1
    assert 0.0 <= metrics["q8_0_greedy_match"] <= 1.0
    assert abs(metrics["q8_0_ppl_delta_pct"]) < 1.0 and metrics["source_perplexity"] > 1
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["files"]["q8_0"]["tensor_types"] == {"F32": 5, "Q8_0": 15}
    assert (out / "tiny.q8_0.Modelfile").read_text().startswith("# Ollama Modelfile for tiny.q8_0.gguf")
    strict = ExportGGUFParams(types=["q8_0"], max_ppl_delta_pct={"q8_0": 0.0})
    with pytest.raises(StageError, match=r"q8_0: perplexity .* \(limit 0.0%: max_ppl_delta_pct.q8_0\)"):
        _check_limits(report["files"], strict, "export")
