"""The grpo and dapo stages on the tiny model with a user-named reward function."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import stage_ctx
from tunegraph.registry import all_kinds


@pytest.mark.parametrize("kind_name,strategy", [("grpo", "lora"), ("dapo", "full")])
def test_rl_stage_runs_and_moves_the_policy(tiny_artifacts, tmp_path, kind_name, strategy):
    kind = all_kinds()[kind_name]
    params = kind.params_model(strategy=strategy, rewards={"toy_rewards:length_parity": 1.0}, group_size=4,
                               batch_size=2, max_steps=2, max_new_tokens=6, learning_rate=1e-2, max_length=128)
    result = kind.fn(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path,
                     stage_ctx(tmp_path, kind_name))
    assert result.metrics["steps"] == 2
    assert math.isfinite(result.metrics["train_loss"]) and 0 <= result.metrics["reward"] <= 1
    assert result.metrics["reward0_errors"] == 0  # failures of the reward function are counted
    before = load_file(tiny_artifacts / "model" / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not move"


def test_rl_stage_is_deterministic(tiny_artifacts, tmp_path):
    kind = all_kinds()["grpo"]
    params = kind.params_model(rewards={"toy_rewards:length_parity": 1.0}, group_size=2, batch_size=2, max_steps=1,
                               max_new_tokens=4, max_length=128)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        kind.fn(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path / run,
                stage_ctx(tmp_path, "grpo"))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
