"""Every objective with every update strategy on the tiny model: two steps, finite loss, and only
the parameters the strategy names change."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import stage_ctx
from tunegraph.context import StageContext, seed_everything
from tunegraph.errors import StageError
from tunegraph.registry import all_kinds

OBJECTIVES = {"sft": "train", "dpo": "pairs", "ipo": "pairs", "simpo": "pairs", "cpo": "pairs", "orpo": "pairs",
              "kto": "unpaired", "grpo": "train", "dapo": "train", "reward_model": "pairs", "ppo": "train"}
# RL objectives sample completions; a reward that varies on a random tiny model keeps advantages non-zero
RL_SETTINGS = {"rewards": {"toy_rewards:length_parity": 1.0}, "group_size": 4, "max_new_tokens": 6, "batch_size": 2}
# PPO scores with a reward model (the fixture below) and whitens advantages, so any reward varies them
PPO_SETTINGS = {"max_new_tokens": 6, "ppo_epochs": 1, "num_minibatches": 2}
STRATEGIES = ("full", "lora", "qlora", "dora", "galore", "spectrum", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning")
ADAPTER = {"lora", "qlora", "dora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning"}
# The whole matrix, 11 x 10 = 110 runs, kept cheap: two examples (pairs) per step outside RL, one PPO epoch
CASES = [(o, s) for o in OBJECTIVES for s in STRATEGIES]


def expected_changes(strategy: str, before: dict, out) -> set[str]:
    """The tensors of the saved (merged) model that the strategy is allowed to change."""
    linear = {n for n in before if n.endswith("proj.weight")}
    if strategy in ("full", "galore"):
        return set(before)
    if strategy in ("lora", "qlora", "dora"):
        return linear
    if strategy == "ia3":
        return {n for n in linear if n.endswith(("k_proj.weight", "v_proj.weight", "down_proj.weight"))}
    if strategy == "spectrum":
        return set(json.loads((out / "spectrum.json").read_text())["trainable_parameters"])
    return set()  # prompt-style: the base is saved unchanged, the learning lives in adapter/


def changed_tensors(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture
def one_thread_ctx():
    """A seeded stage context on ONE torch thread, the thread count restored afterwards. The matrix checks
    wiring, not speed: on a tiny model two threads mostly wait on each other (an SVD of GaLore's 64 x 64
    matrices takes ~0.3 ms on one thread, ~90 ms on two when the cores are busy, e.g. under xdist)."""
    threads = torch.get_num_threads()

    def make(workspace, name):
        seed_everything(5, 1)
        return StageContext(stage=name, seed=5, threads=1, workspace=workspace)

    yield make
    torch.set_num_threads(threads)


@pytest.mark.parametrize("objective,strategy", CASES)
def test_objective_trains_under_strategy(tiny_artifacts, request, tmp_path, one_thread_ctx, objective, strategy):
    kind = all_kinds()[objective]
    settings = {"batch_size": 2, **(RL_SETTINGS if objective in ("grpo", "dapo") else {}),
                **(PPO_SETTINGS if objective == "ppo" else {})}
    params = kind.params_model(strategy=strategy, max_steps=2, learning_rate=1e-3, max_length=128, **settings)
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / OBJECTIVES[objective]}
    if objective == "ppo":
        inputs["reward_model"] = request.getfixturevalue("reward_model_dir")
    result = kind.fn(params, inputs, tmp_path, one_thread_ctx(tmp_path, objective))
    assert result.metrics["steps"] == 2
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(result.metrics["first_loss"])

    before = load_file(tiny_artifacts / "model" / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors")
    if objective == "reward_model":  # the LM head gives way to a new scalar score head, trained under every strategy
        assert set(after) - set(before) == {"score.weight"}
        after = {name: tensor for name, tensor in after.items() if name in before}
    changed = changed_tensors(before, after)
    expected = expected_changes(strategy, before, tmp_path) - {"score.weight"}  # spectrum.json names it too
    assert changed == expected
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() == (strategy in ADAPTER)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_objective_refuses_chat_only_data(tiny_artifacts, tmp_path, objective):
    kind = all_kinds()[objective]
    params = kind.params_model(max_steps=1, batch_size=4, max_length=128)
    with pytest.raises(StageError, match="needs (preference pairs|unpaired feedback)"):
        kind.fn(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path,
                stage_ctx(tmp_path, objective))


def test_dpo_improves_reward_accuracy_on_its_training_pairs(tiny_artifacts, tmp_path, one_thread_ctx):
    """A few more steps of DPO separate chosen from rejected: the implicit reward margin grows."""
    kind = all_kinds()["dpo"]
    params = kind.params_model(strategy="lora", epochs=6, batch_size=8, learning_rate=5e-3, max_length=128,
                               beta=0.5)
    result = kind.fn(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "pairs"}, tmp_path,
                     one_thread_ctx(tmp_path, "dpo"))
    assert result.metrics["train_loss"] < result.metrics["first_loss"]
    assert result.metrics["reward_margin"] > 0
