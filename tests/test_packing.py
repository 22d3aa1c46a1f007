"""SFT packing: several examples per sequence, no attention across them, the same loss as unpacked."""

from __future__ import annotations

import pytest
import torch

from conftest import stage_ctx
from tunegraph.chat_data import read_rows
from tunegraph.errors import StageError
from tunegraph.modelio import load_tokenizer
from tunegraph.tasks.sft import SFTParams, sft
from tunegraph.training.chat_encoding import IGNORE_INDEX, encode_chat
from tunegraph.training.loop import collate
from tunegraph.training.packing import collate_packed, pack, pack_examples, packed_loss
from tunegraph.training.strategies import apply_strategy, load_base


def _examples(tiny_artifacts, n=8):
    tokenizer = load_tokenizer(tiny_artifacts / "model")
    rows = read_rows(tiny_artifacts / "train")[:n]
    return tokenizer, [encode_chat(tokenizer, row["messages"], 256, row["id"]) for row in rows]


def test_best_fit_decreasing_fills_sequences_without_splitting():
    lengths = [5, 9, 3, 7, 2, 6, 4]
    bins = pack(lengths, 10)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= 10 for members in bins)
    assert bins == [[0, 4], [1], [2, 3], [5, 6]]  # 5+2 | 9 | 3+7 | 6+4 (best fit: 4 goes with 6, not 5)
    assert pack(lengths, 10) == bins  # deterministic
    with pytest.raises(ValueError, match="longer than max_length"):
        pack([11], 10)


def test_packed_batch_has_fewer_rows_and_keeps_every_label(tiny_artifacts):
    tokenizer, examples = _examples(tiny_artifacts)
    packed = pack_examples(examples, 256)
    assert len(packed) < len(examples)
    batch = collate_packed(packed, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == len(packed) and "attention_mask" not in batch
    for row, members in enumerate(packed):
        start = 0
        for example in members:
            n = len(example.input_ids)
            assert batch["input_ids"][row, start:start + n].tolist() == example.input_ids
            assert batch["position_ids"][row, start:start + n].tolist() == list(range(n))
            # the first label is never predicted (unpacked nothing precedes it): masked, the rest kept
            assert batch["labels"][row, start:start + n].tolist() == [IGNORE_INDEX, *example.labels[1:]]
            start += n
        assert (batch["labels"][row, start:] == IGNORE_INDEX).all()
    labelled = sorted(t for e in examples for t in e.labels if t != IGNORE_INDEX)
    assert sorted(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()) == labelled


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_packed_loss_equals_the_unpacked_loss(tiny_artifacts, strategy):
    """Attention stays inside each example: every packed token's logits are the unpacked ones, and the
    loss is the same token mean over assistant tokens as the padded batch of the same examples."""
    tokenizer, examples = _examples(tiny_artifacts)
    model = apply_strategy(load_base(tiny_artifacts / "model", strategy), strategy)
    packed = pack_examples(examples, 256)
    with torch.no_grad():
        packed_batch = collate_packed(packed, tokenizer.pad_token_id)
        loss = packed_loss(model, packed_batch)
        unpacked = model(**collate(examples, tokenizer.pad_token_id)).loss
        assert torch.allclose(loss, unpacked, rtol=1e-5, atol=1e-6)
        logits = model(**packed_batch, use_cache=False).logits
        first = packed[0]
        alone = model(input_ids=torch.tensor([first[-1].input_ids])).logits[0]
        offset = sum(len(e.input_ids) for e in first[:-1])
        assert torch.allclose(logits[0, offset:offset + len(first[-1].input_ids)], alone, atol=1e-5)
        # with a cache transformers drops the block-diagonal mask: the same call leaks across examples
        leaky = model(**packed_batch).logits
        assert not torch.allclose(leaky[0, offset:offset + len(first[-1].input_ids)], alone, atol=1e-3)


def test_sft_packing_trains_deterministically(tiny_artifacts, tmp_path, capsys):
    params = SFTParams(strategy="lora", packing=True, max_steps=2, batch_size=2, max_length=256,
                       learning_rate=1e-3)
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}
    results = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        results.append(sft(params, inputs, tmp_path / run, stage_ctx(tmp_path)))
    metrics = results[0].metrics
    assert metrics["examples"] == 16 and metrics["packed_sequences"] < 16 and metrics["steps"] == 2
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert "packing: 16 examples into" in capsys.readouterr().err
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_packing_is_part_of_the_fingerprint():
    assert SFTParams(packing=True).fingerprint_params() != SFTParams().fingerprint_params()
    assert SFTParams(packing=True).fingerprint_params()["packing"] is True


def test_packing_refuses_prompt_style_adapters(tiny_artifacts, tmp_path):
    params = SFTParams(strategy="prefix_tuning", packing=True, max_steps=1)
    with pytest.raises(StageError, match=r"stage 'pk': packing: true cannot keep packed examples apart under "
                                         r"prefix_tuning"):
        sft(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path,
            stage_ctx(tmp_path, "pk"))


def test_fused_loss_of_a_packed_batch_matches(tiny_artifacts):
    """``kernels: true`` reads the same position ids: the fused loss is the packed logits path's loss."""
    from tunegraph.training.fused_head import causal_lm_loss

    tokenizer, examples = _examples(tiny_artifacts, n=4)
    model = load_base(tiny_artifacts / "model", "full")
    batch = collate_packed(pack_examples(examples, 256), tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(causal_lm_loss(model, batch), packed_loss(model, batch), rtol=1e-5)
