"""Reward model: the Bradley–Terry loss against TRL 1.16 and by hand, scores read by attention mask
(pad == EOS), the score head training under the update strategies, and the stage's artifact."""

from __future__ import annotations

import json
import math
import os
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, stage_ctx
from tunegraph.chat_data import read_rows
from tunegraph.errors import StageError
from tunegraph.modelio import load_tokenizer
from tunegraph.registry import all_kinds
from tunegraph.tasks.reward_model import RewardModelParams
from tunegraph.training.chat_encoding import IGNORE_INDEX
from tunegraph.training.objectives.reward_model import bradley_terry_loss
from tunegraph.training.reward_model import (REWARD_MODEL_FILE, encode_pairs, load_reward_model, pairwise_metrics,
                                             sequence_scores)
from tunegraph.training.session import load_trainable
from tunegraph.training.strategies import STRATEGIES, load_base

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32, same formula: a few ulp apart at most


class FakeAccelerator:
    """What ``RewardTrainer.compute_loss`` reads from ``self.accelerator`` on one CPU process."""

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_reward_loss(scores: torch.Tensor, margin: torch.Tensor | None, center: float | None) -> torch.Tensor:
    """TRL 1.16 ``RewardTrainer.compute_loss`` called unbound on a stand-in trainer; its model returns
    ``scores`` ([chosen; rejected]) as the pooled logits, as a ``num_labels=1`` classifier does."""
    trainer = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=FakeAccelerator(),
                                    args=types.SimpleNamespace(center_rewards_coefficient=center),
                                    _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list)})
    inputs = {"input_ids": torch.zeros(len(scores), 3, dtype=torch.long),
              "attention_mask": torch.ones(len(scores), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    model = lambda **kwargs: types.SimpleNamespace(logits=scores.unsqueeze(-1))  # noqa: E731
    return trl_reward.RewardTrainer.compute_loss(trainer, model, inputs)


@pytest.mark.parametrize("use_margin,center", [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center):
    generator = torch.Generator().manual_seed(3)
    scores = (torch.randn(10, generator=generator) * 3).requires_grad_()
    margin = torch.rand(5, generator=generator) if use_margin else None
    expected = trl_reward_loss(scores, margin, center)
    (expected_grad,) = torch.autograd.grad(expected, scores)
    ours = bradley_terry_loss(scores[:5], scores[5:], margin=margin if use_margin else 0.0,
                              center_rewards_coefficient=center)
    (our_grad,) = torch.autograd.grad(ours.loss, scores)
    torch.testing.assert_close(ours.loss, expected, **TOL)
    torch.testing.assert_close(our_grad, expected_grad, **TOL)


def test_bradley_terry_by_hand():
    result = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # pair 1: -log sigma(1) = log(1 + e^-1); pair 2: -log sigma(-1) = log(1 + e)
    torch.testing.assert_close(result.loss, torch.tensor((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2))
    assert float(result.metrics["accuracy"]) == 0.5 and float(result.metrics["margin"]) == 0.0
    centered = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=0.5, center_rewards_coefficient=0.1)
    torch.testing.assert_close(centered.loss, -F.logsigmoid(torch.tensor(0.5)) + 0.1 * 9.0)


def test_scores_are_read_at_the_last_attended_token_even_when_it_is_the_pad_id(tiny_artifacts):
    """SmolLM2's pad id is its EOS, the token that ends every reply: transformers' pooling (last token that
    is not the pad id) skips it; ``sequence_scores`` reads the last position the attention mask keeps."""
    torch.manual_seed(0)
    model = load_base(tiny_artifacts / "model", "full", head="score").eval()
    pad = model.config.pad_token_id
    ids = torch.tensor([[1, 40, 41, 42, pad, pad],   # reply ends with EOS (= pad id), then right padding
                        [1, 50, 51, 52, 53, 54]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ours = sequence_scores(model, ids, mask)
        # each sequence alone, through the backbone and the head: the score of its last token
        alone = [model.score(model.model(input_ids=ids[i:i + 1, :n]).last_hidden_state)[0, -1, 0]
                 for i, n in enumerate((5, 6))]
        pooled = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(ours, torch.stack(alone), **TOL)
    assert pooled[1] == pytest.approx(float(ours[1]), abs=1e-6)  # no pad id inside: both poolings agree
    assert abs(float(pooled[0] - ours[0])) > 1e-4  # transformers' pooling stopped before the EOS


def test_pairs_end_at_the_replys_eos(tiny_artifacts):
    tokenizer = load_tokenizer(tiny_artifacts / "model")
    rows = read_rows(tiny_artifacts / "pairs")[:3]
    data = encode_pairs(tokenizer, rows, 128, stage_ctx(tiny_artifacts))
    for example in data.chosen + data.rejected:
        assert example.input_ids[-1] == tokenizer.eos_token_id and example.labels[-1] != IGNORE_INDEX
    # the template's newline after <|im_end|> is what was cut
    full = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tokenizer.decode(data.chosen[0].input_ids) + "\n" == full


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_score_head_trains_under_every_strategy(tiny_artifacts, tmp_path, strategy):
    model, _ = load_trainable(tiny_artifacts / "model", RewardModelParams(strategy=strategy), stage_ctx(tmp_path),
                              head="score")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(name.endswith("score.weight") or ".score.modules_to_save." in name for name in trainable), trainable
    assert not any("lora_" in name and "score" in name for name in trainable)  # the head is trained whole


@pytest.fixture(scope="module")
def refusal_pairs(tmp_path_factory) -> dict[str, Path]:
    """Pairs whose rejected reply is always "I do not know.": a preference a reward model can learn from
    the reply alone (in ``tiny_artifacts/pairs`` every answer is chosen once and rejected once, so only
    prompt-reply interactions separate them, which a random 2-layer model learns slowly). Train on 16
    prompts, hold out 8 others."""
    from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset

    root = tmp_path_factory.mktemp("refusal_pairs")
    lines = (REPO / "data/quickstart/train.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    rows = [json.loads(line) for line in lines]
    datasets = {}
    for name, part in (("train", rows[:16]), ("held_out", rows[16:])):
        source = root / f"{name}.jsonl"
        source.write_text("".join(json.dumps({"prompt": r["instruction"], "chosen": r["output"],
                                              "rejected": "I do not know."}) + "\n" for r in part))
        (root / name).mkdir()
        load_dataset(LoadDatasetParams(path=str(source)), {}, root / name, stage_ctx(root))
        datasets[name] = root / name
    return datasets


@pytest.mark.parametrize("strategy", ["lora", "prompt_tuning"])
def test_reward_model_learns_a_preference_and_reloads(tiny_artifacts, refusal_pairs, tmp_path, strategy):
    kind = all_kinds()["reward_model"]
    params = kind.params_model(strategy=strategy, epochs=2, batch_size=8, learning_rate=1e-2, max_length=128)
    inputs = {"model": tiny_artifacts / "model", "dataset": refusal_pairs["train"],
              "held_out": refusal_pairs["held_out"]}
    result = kind.fn(params, inputs, tmp_path, stage_ctx(tmp_path, "reward_model"))
    metrics = result.metrics
    assert metrics["steps"] == 4 and metrics["train_loss"] < metrics["first_loss"]
    assert metrics["train_accuracy"] >= 0.9 and metrics["train_margin"] > 0
    assert metrics["held_out_accuracy"] >= 0.75 and metrics["held_out_margin"] > 0  # unseen prompts
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert json.loads((tmp_path / REWARD_MODEL_FILE).read_text())["loss"] == "bradley_terry"

    reloaded = load_reward_model(tmp_path, "ppo")  # merged LoRA / base + prompt adapter
    tokenizer = load_tokenizer(tmp_path)
    data = encode_pairs(tokenizer, read_rows(refusal_pairs["train"]), 128, stage_ctx(tmp_path))
    again = pairwise_metrics(reloaded, data, tokenizer.pad_token_id)
    assert again["accuracy"] == metrics["train_accuracy"]
    assert again["margin"] == pytest.approx(metrics["train_margin"], rel=1e-3, abs=1e-5)


def test_reward_model_refuses_chat_only_data(tiny_artifacts, tmp_path):
    kind = all_kinds()["reward_model"]
    with pytest.raises(StageError, match="needs preference pairs"):
        kind.fn(kind.params_model(max_steps=1),
                {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path,
                stage_ctx(tmp_path, "reward_model"))
