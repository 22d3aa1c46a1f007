"""SFT and evaluate stages on the tiny model, called as plain functions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.errors import StageError
from tunegraph.modelio import load_tokenizer
from tunegraph.tasks.evaluate import EvaluateParams, evaluate, normalize_answer
from tunegraph.tasks.sft import SFTParams, sft
from tunegraph.training.chat_encoding import IGNORE_INDEX, encode_chat

MESSAGES = [{"role": "user", "content": "What is the capital of Canada?"}, {"role": "assistant", "content": "Ottawa"}]


from conftest import stage_ctx as ctx


def test_only_assistant_tokens_and_end_of_turn_are_labelled(tiny_artifacts):
    tokenizer = load_tokenizer(tiny_artifacts / "model")
    encoded = encode_chat(tokenizer, MESSAGES, max_length=256)
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled).strip() == "Ottawa<|im_end|>"
    assert encoded.labels[: len(encoded.labels) - len(labelled)] == [IGNORE_INDEX] * (len(encoded.labels) - len(labelled))
    assert not encoded.truncated


def test_end_of_turn_stays_labelled_when_pad_equals_eos(tiny_artifacts):
    """SmolLM2 pads with its EOS token. Masking padding by token id would also mask the real
    end-of-turn and unlearn stopping; collate masks padding by position, so EOS keeps its label."""
    from tunegraph.training.loop import collate

    tokenizer = load_tokenizer(tiny_artifacts / "model")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = encode_chat(tokenizer, MESSAGES, max_length=256)
    longer = encode_chat(tokenizer, MESSAGES[:1] + [{"role": "assistant", "content": "Ottawa, in Ontario"}], 256)
    batch = collate([short, longer], tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    assert (batch["labels"][0] == eos).sum() == 1  # the real end of turn, not the padding after it
    assert (batch["input_ids"][0] == eos).sum() > 1  # padding is EOS too


def test_multi_turn_labels_every_assistant_turn(tiny_artifacts):
    tokenizer = load_tokenizer(tiny_artifacts / "model")
    turns = MESSAGES + [{"role": "user", "content": "And of France?"}, {"role": "assistant", "content": "Paris"}]
    labels = encode_chat(tokenizer, turns, max_length=256).labels
    text = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "Ottawa" in text and "Paris" in text and "France" not in text


def test_sft_lora_changes_weights_and_saves_adapter(tiny_artifacts, tmp_path):
    params = SFTParams(strategy="lora", max_steps=3, batch_size=4, learning_rate=5e-3, max_length=128)
    result = sft(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path, ctx(tmp_path))
    assert result.metrics["steps"] == 3 and torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    before = load_file(tiny_artifacts / "model" / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("proj" in k for k in changed)  # LoRA touches linear layers only
    assert not any("embed" in k or "norm" in k for k in changed)


def test_sft_is_deterministic(tiny_artifacts, tmp_path):
    params = SFTParams(strategy="lora", max_steps=2, batch_size=4, max_length=128)
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        sft(params, inputs, tmp_path / run, ctx(tmp_path))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_sft_refuses_data_whose_labels_are_all_truncated(tiny_artifacts, tmp_path):
    params = SFTParams(max_steps=1, max_length=8, max_truncated_fraction=1.0)
    with pytest.raises(StageError, match="labels are masked"):
        sft(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path, ctx(tmp_path))


def test_sft_refuses_silent_truncation(tiny_artifacts, tmp_path):
    params = SFTParams(max_steps=1, max_length=40)
    with pytest.raises(StageError, match="exceed max_length=40"):
        sft(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path, ctx(tmp_path))


def test_evaluate_scores_and_baseline_deltas(tiny_artifacts, tmp_path):
    params = EvaluateParams(max_new_tokens=3, limit=4)
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "eval"}
    (tmp_path / "base").mkdir()
    base = evaluate(params, inputs, tmp_path / "base", ctx(tmp_path))
    assert base.metrics["rows"] == 4 and base.metrics["perplexity"] > 1
    predictions = [json.loads(line) for line in (tmp_path / "base/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and {"answer", "reference", "exact", "contains"} <= set(predictions[0])
    (tmp_path / "again").mkdir()
    again = evaluate(params, {**inputs, "baseline": tmp_path / "base"}, tmp_path / "again", ctx(tmp_path))
    assert again.metrics["delta_exact_match"] == 0 and again.metrics["delta_loss"] == 0


@pytest.mark.parametrize("answer,reference,same", [
    ("Ottawa.", "Ottawa", True), ("  Ottawa\nMore text", "Ottawa", True), ('"Paris"', "Paris", True),
    ("lazy road", "LAZY ROAD", False), ("The capital is Ottawa.", "Ottawa", False),
])
def test_normalize_answer(answer, reference, same):
    assert (normalize_answer(answer) == normalize_answer(reference)) is same


def test_sft_artifact_holds_no_absolute_paths(tiny_artifacts, tmp_path):
    """Artifacts must not depend on the workspace location (dvc repro elsewhere gives the same bytes)."""
    params = SFTParams(strategy="lora", max_steps=1, batch_size=4, max_length=128)
    sft(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path, ctx(tmp_path))
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".jinja", ".txt"}:
            text = path.read_text(encoding="utf-8")
            assert str(tiny_artifacts) not in text and str(tmp_path) not in text, path


def test_adapter_config_does_not_depend_on_the_hash_seed(tiny_artifacts, tmp_path):
    import subprocess
    import sys

    script = ("import sys, os; from pathlib import Path; from tunegraph.context import StageContext, seed_everything;"
              "from tunegraph.tasks.sft import SFTParams, sft; seed_everything(5, 2); a = Path(sys.argv[1]);"
              "out = Path(sys.argv[2]); out.mkdir();"
              "sft(SFTParams(max_steps=1, batch_size=4, max_length=128), {'model': a / 'model', 'dataset': a / 'train'},"
              " out, StageContext(stage='t', seed=5, threads=2, workspace=out))")
    for seed in ("1", "2"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-P", "-c", script, str(tiny_artifacts), str(tmp_path / seed)], env=env, check=True,
                       capture_output=True)
    config = "adapter/adapter_config.json"
    assert (tmp_path / "1" / config).read_bytes() == (tmp_path / "2" / config).read_bytes()


NO_END_OF_TURN = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                  "{% if message['role'] != 'assistant' %}<|im_end|>\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_sft_refuses_a_template_without_end_of_turn_after_replies(tiny_artifacts, tmp_path):
    """A chat template that ends user turns but not assistant ones: no reply's EOS is labelled, so SFT
    would teach the model never to stop. Refused before training, naming the stage and a row."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_artifacts / "model", model_dir)
    (model_dir / "chat_template.jinja").write_text(NO_END_OF_TURN, encoding="utf-8")
    assert "<|im_end|>" not in tokenizer_decode_labels(model_dir)
    with pytest.raises(StageError, match=r"^stage 'sft_eot': row '[^']+': an assistant turn ends without a labelled "
                                         r"end-of-turn token \(eos '<\|im_end\|>'\), so the model would unlearn "
                                         r"stopping.*; use a model whose chat template"):
        sft(SFTParams(max_steps=1, max_length=128), {"model": model_dir, "dataset": tiny_artifacts / "train"},
            tmp_path / "out", ctx(tmp_path, "sft_eot"))


def tokenizer_decode_labels(model_dir) -> str:
    tokenizer = load_tokenizer(model_dir)
    encoded = encode_chat(tokenizer, MESSAGES, max_length=256)
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_stopping_check_refuses_truncation_that_cuts_every_end_of_turn(tiny_artifacts, capsys):
    from tunegraph.training.session import check_stopping

    tokenizer = load_tokenizer(tiny_artifacts / "model")
    full = encode_chat(tokenizer, MESSAGES, max_length=256)
    cut = encode_chat(tokenizer, MESSAGES, max_length=len(full.input_ids) - 2)  # drops "<|im_end|>" and "\n"
    assert cut.truncated and tokenizer.decode([t for t in cut.labels if t != IGNORE_INDEX]) == "Ottawa"
    params = SFTParams(max_length=len(cut.input_ids), max_truncated_fraction=1.0)
    with pytest.raises(StageError, match=r"^stage 't': truncation at max_length=\d+ cuts the end-of-turn token "
                                         r"\(eos '<\|im_end\|>'\) from every example.*; raise max_length$"):
        check_stopping([cut, cut], ["r0", "r1"], tokenizer, params, ctx(tiny_artifacts))
    check_stopping([cut, full], ["r0", "r1"], tokenizer, params, ctx(tiny_artifacts))  # one still teaches it
    # pad == eos (SmolLM2): allowed, and said on one info line
    assert "[t] pad token = eos token '<|im_end|>': padding is masked by position" in capsys.readouterr().err
