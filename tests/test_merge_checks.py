"""Merge refusals: models that differ in architecture, shapes, vocabulary or chat template are named
with what differs, before mergekit runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import stage_ctx
from tunegraph.errors import StageError
from tunegraph.merge_checks import IncompatibleModels, check_compatible, check_weights_are_the_model


@pytest.fixture(scope="module")
def base(tiny_artifacts) -> Path:
    return tiny_artifacts / "model"


def variant(base: Path, out: Path) -> Path:
    shutil.copytree(base, out)
    return out


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config, indent=2))


def refusal(models: dict[str, Path]) -> str:
    with pytest.raises(IncompatibleModels) as caught:
        check_compatible(models)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_identical_models_and_a_resaved_tokenizer_pass(base, tmp_path):
    from transformers import AutoTokenizer

    same = variant(base, tmp_path / "same")
    AutoTokenizer.from_pretrained(base).save_pretrained(same)  # may reformat files; the vocabulary is equal
    facts = check_compatible({"base": base, "same": same})
    assert [f.name for f in facts] == ["base", "same"] and facts[0].structure["hidden_size"] == 64


def test_different_hidden_size_is_named(base, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.hidden_size, config.head_dim = 32, 8
    narrow = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(config).save_pretrained(narrow)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(base / name, narrow / name)
    message = refusal({"base": base, "narrow": narrow})
    assert "'base' and 'narrow'" in message and "different hidden_size (64 vs 32)" in message


def test_different_architecture_is_named(base, tmp_path):
    other = variant(base, tmp_path / "other")
    edit_config(other, model_type="mistral", architectures=["MistralForCausalLM"])
    assert "different architectures (llama/LlamaForCausalLM vs mistral/MistralForCausalLM)" in \
        refusal({"base": base, "other": other})


def test_missing_or_reshaped_tensor_is_named(base, tmp_path):
    state = load_file(base / "model.safetensors")
    missing = variant(base, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, missing / "model.safetensors")
    assert "tensor 'model.norm.weight' is in 'base' but not in 'missing'" in refusal({"base": base, "missing": missing})
    reshaped = variant(base, tmp_path / "reshaped")
    state["model.norm.weight"] = state["model.norm.weight"][:32].contiguous()
    save_file(state, reshaped / "model.safetensors")
    assert "tensor 'model.norm.weight' has shape (64,) vs (32,)" in refusal({"base": base, "reshaped": reshaped})


def test_different_vocabulary_names_the_first_differing_token(base, tmp_path):
    from transformers import AutoTokenizer

    extended = variant(base, tmp_path / "extended")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<merge_probe>"])
    tokenizer.save_pretrained(extended)
    message = refusal({"base": base, "extended": extended})
    assert "different vocabularies (49152 vs 49153 tokens; id 49152 is None vs '<merge_probe>')" in message


def test_different_chat_template_is_named(base, tmp_path):
    other = variant(base, tmp_path / "other")
    template = (base / "chat_template.jinja").read_text().splitlines()
    template[1] = template[1] + " {# changed #}"
    (other / "chat_template.jinja").write_text("\n".join(template))
    message = refusal({"base": base, "other": other})
    assert "different chat templates (first difference on template line 2)" in message
    (other / "chat_template.jinja").unlink()
    assert "different chat templates ('other' has none)" in refusal({"base": base, "other": other})


def test_prompt_style_artifacts_are_refused(base, tmp_path):
    prompt = variant(base, tmp_path / "prompt")
    (prompt / "requires_adapter.json").write_text("{}")
    with pytest.raises(IncompatibleModels, match="'prompt': it was trained with a prompt-style adapter"):
        check_weights_are_the_model({"base": base, "prompt": prompt})


def test_merge_stage_refuses_before_writing_anything(base, tmp_path):
    from tunegraph.tasks.merge import MergeParams, merge

    other = variant(base, tmp_path / "other")
    edit_config(other, num_hidden_layers=3)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match=r"'base' and 'other': different num_hidden_layers \(2 vs 3\)"):
        merge(MergeParams(method="linear"), {"models": {"base": base, "other": other}}, out, stage_ctx(out))
    assert not any(out.iterdir())
