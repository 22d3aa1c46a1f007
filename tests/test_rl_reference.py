"""The KL reference of GRPO/DAPO/PPO is the initial policy under every strategy, prompt-style adapters included
(switching their adapter off gives the base without virtual tokens, which was never the policy)."""

from __future__ import annotations

import pytest
import torch

from conftest import stage_ctx
from tunegraph.modelio import load_tokenizer
from tunegraph.registry import all_kinds
from tunegraph.training.chat_encoding import prompt_ids
from tunegraph.training.grpo import make_reference
from tunegraph.training.strategies import apply_strategy, load_base


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("strategy", ["lora", "prefix_tuning", "prompt_tuning", "p_tuning"])
def test_reference_is_the_initial_policy(tiny_artifacts, strategy):
    torch.manual_seed(0)
    model_dir = tiny_artifacts / "model"
    model = apply_strategy(load_base(model_dir, strategy), strategy).eval()
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of Canada?"}])])
    initial = _logits(model, ids)
    reference = make_reference(model, beta=0.1)
    with torch.no_grad():  # an update: every trainable parameter moves
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    ref_model, context = reference()
    with context:
        assert torch.equal(_logits(ref_model, ids), initial)
    assert not torch.allclose(_logits(model, ids), initial)  # the policy itself did move (context restored)
    with model.disable_adapter():  # why prompt-style adapters need their own reference
        adapter_off = _logits(model, ids)
    assert torch.allclose(adapter_off, initial, atol=1e-6) == (strategy == "lora")


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_first_step_kl_is_zero_under_prompt_tuning(tiny_artifacts, tmp_path, objective):
    """Before the first update the policy is the reference: KL(pi || pi_ref) = 0 exactly."""
    kind = all_kinds()[objective]
    settings = {"group_size": 4, "batch_size": 2} if objective == "grpo" else {"batch_size": 2, "ppo_epochs": 1}
    params = kind.params_model(strategy="p_tuning", max_steps=1, max_length=128, max_new_tokens=4,
                               rewards={"toy_rewards:length_parity": 1.0}, **settings)
    result = kind.fn(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path,
                     stage_ctx(tmp_path, objective))
    assert result.metrics["kl"] == 0.0
