"""PPO-RLHF: the loss pieces against hand-computed values, and the ``ppo`` stage on the tiny model.

TRL 1.16 has no PPO trainer left (it was removed from ``trl.trainer`` and is not in
``trl.experimental``), so there is no TRL function to compare with: every expected number below is
worked out by hand in the comment beside it.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from conftest import stage_ctx
from tunegraph.context import StageContext, seed_everything
from tunegraph.errors import StageError
from tunegraph.registry import all_kinds
from tunegraph.chat_data import read_rows
from tunegraph.modelio import load_tokenizer
from tunegraph.tasks.ppo import PPOParams
from tunegraph.training.grpo import RolloutSettings
from tunegraph.training.ppo import PPOSettings, collect_experience, completion_frame, ppo_update, right_padded
from tunegraph.training.session import load_trainable
from tunegraph.training.value_head import PolicyWithValue, ValueHead
from tunegraph.training.objectives.ppo import (clipped_value_loss, gae, masked_whiten, per_token_kl,
                                               ppo_policy_loss, shaped_rewards)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second completion ended (EOS) at its 2nd token


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 7.0]])  # 7.0 lies after the end: ignored
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # so does 9.0 (V after the end is 0)
    advantages, returns = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 1 (gamma lam = 0.72):  d2 = 1 - 0.3 = 0.7                 A2 = 0.7
    #                            d1 = 0.9*0.3 - 0.2 = 0.07          A1 = 0.07 + 0.72*0.7 = 0.574
    #                            d0 = 0.9*0.2 - 0.1 = 0.08          A0 = 0.08 + 0.72*0.574 = 0.49328
    # row 2:                     d1 = 0 + 0.9*0 - 0.5 = -0.5        A1 = -0.5
    #                            d0 = 0.5 + 0.9*0.5 - 0.4 = 0.55    A0 = 0.55 + 0.72*(-0.5) = 0.19
    assert_close(advantages, torch.tensor([[0.49328, 0.574, 0.7], [0.19, -0.5, 0.0]]))
    assert_close(returns, torch.tensor([[0.59328, 0.774, 1.0], [0.59, 0.0, 0.0]]))  # R = A + V


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, 5, generator=generator), torch.randn(2, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask  # Monte Carlo return
    assert_close(returns, to_go)
    assert_close(advantages, (to_go - values) * mask)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    rewards = shaped_rewards(torch.tensor([1.0, 2.0]), kl, MASK, kl_coef=0.5)
    # -0.5 * KL on every token; + score on token 3 (row 1) and token 2 (row 2); 0 after the end
    assert_close(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]]))


def test_kl_estimators():
    logps, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.4]))
    assert_close(per_token_kl(logps, ref, "k1"), torch.tensor([math.log(2.0), math.log(0.5)]))
    # k3 = r - log r - 1 with r = pi_ref / pi
    assert_close(per_token_kl(logps, ref, "k3"), torch.tensor([0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1]))


def test_masked_whiten():
    values = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 3, unbiased variance (4 + 0 + 4) / 2 = 4, std 2; the masked 100 is ignored and returned as 0
    assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([[2.0, 3.0, 4.0, 0.0]]),
                 atol=1e-6, rtol=0)  # (x - 3) / 2 + 3: rescaled, mean kept


def test_clipped_policy_loss_and_its_gradient():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    loss, metrics = ppo_policy_loss(logps, old, advantages, torch.ones(1, 3), cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped)   token 2: max(0.5, 0.8) = 0.8 (clipped)
    # token 3: max(-1.1, -1.1) = -1.1 (inside the clip range)
    assert_close(loss, torch.tensor((-1.2 + 0.8 - 1.1) / 3))
    assert_close(metrics["clipfrac"], torch.tensor(2 / 3))
    loss.backward()
    # clipped tokens get no gradient; the unclipped one d/dlogp (-A rho / 3) = -1.1 / 3
    assert_close(logps.grad, torch.tensor([[0.0, 0.0, -1.1 / 3]]))


def test_clipped_value_loss():
    old, returns = torch.zeros(1, 2), torch.ones(1, 2)
    values = torch.tensor([[0.5, 0.1]])
    loss, metrics = clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 1: (0.5 - 1)^2 = 0.25 vs clipped V = 0.2: (0.2 - 1)^2 = 0.64 -> 0.64
    # token 2: inside the clip range: (0.1 - 1)^2 = 0.81 both ways
    assert_close(loss, torch.tensor(0.5 * (0.64 + 0.81) / 2))
    assert_close(metrics["value_clipfrac"], torch.tensor(0.5))


def test_rollouts_are_right_padded_for_the_reward_model():
    sequences = torch.tensor([[0, 0, 5, 6, 7, 2, 2], [0, 8, 9, 10, 11, 12, 2]])  # left pad, prompt, completion
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])  # row 1 ended with EOS (2) at column 5
    ids, attention = right_padded(sequences, mask, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 2, 0, 0], [8, 9, 10, 11, 12, 2]]
    assert attention.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_an_update_moves_the_policy_toward_the_better_scored_completion(tiny_artifacts, tmp_path):
    """Real rollouts from the tiny policy, one scored +1 and one -1 (no KL, V = 0 at first): after the
    PPO epochs the +1 completion is more likely, the -1 one less, and the values are nearer the returns."""
    tokenizer = load_tokenizer(tiny_artifacts / "model")
    seed_everything(5, 2)
    policy, _ = load_trainable(tiny_artifacts / "model", PPOParams(strategy="lora"), stage_ctx(tmp_path))
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size))
    ppo = PPOSettings(kl_coef=0.0, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
                      lam=1.0, ppo_epochs=2, num_minibatches=1, whiten_rewards=False, missing_eos_penalty=None)
    rows = read_rows(tiny_artifacts / "train")[:2]
    experience = collect_experience(model, tokenizer, rows, lambda rollout, batch: torch.tensor([1.0, -1.0]),
                                    RolloutSettings(1, 4, 1.0, 1.0), ppo, reference=None)
    assert (experience.advantages[0][experience.mask[0]] > 0).all()
    assert (experience.advantages[1][experience.mask[1]] < 0).all()
    # a small step: with large ones Adam's momentum and the value loss (which shares the backbone) carry
    # the policy past the clip range, where PPO no longer controls where it goes
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ppo_update(model, experience, optimizer, ppo, grad_accum=1, max_grad_norm=1.0)
    with torch.no_grad():
        logps, values, mask = completion_frame(model.eval(), experience.rollout)
    change = ((logps - experience.logps) * mask).sum(-1)
    assert change[0] > 0 > change[1]
    error_before = ((experience.values - experience.returns) ** 2 * mask).sum()
    assert ((values - experience.returns) ** 2 * mask).sum() < error_before


# --- the stage ---------------------------------------------------------------------------------

RUN = dict(max_steps=2, batch_size=2, max_new_tokens=4, ppo_epochs=2, learning_rate=1e-2, max_length=128)


def run_ppo(tiny_artifacts, out, reward_model=None, step_logger=None, checkpoint_dir=None, **params):
    kind = all_kinds()["ppo"]
    inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}
    if reward_model is not None:
        inputs["reward_model"] = reward_model
    seed_everything(5, 2)
    ctx = StageContext(stage="ppo", seed=5, threads=2, workspace=out, step_logger=step_logger,
                       checkpoint_dir=checkpoint_dir)
    return kind.fn(kind.params_model(**{**RUN, **params}), inputs, out, ctx)


def test_ppo_stage_logs_its_metrics_and_moves_the_policy(tiny_artifacts, reward_model_dir, tmp_path):
    logged = []
    result = run_ppo(tiny_artifacts, tmp_path, reward_model_dir, step_logger=lambda step, m: logged.append(m),
                     rewards={"toy_rewards:length_parity": 1.0}, num_minibatches=2)
    assert result.metrics["steps"] == 2 and len(logged) == 2
    for metrics in logged:
        for key in ("loss", "lr", "tokens_per_s", "reward", "kl", "policy_loss", "value_loss", "clipfrac",
                    "value_clipfrac", "approx_kl"):
            assert math.isfinite(metrics[key]), key
    assert logged[0]["kl"] == 0  # the first rollout comes from the reference policy itself
    assert result.metrics["reward0_errors"] == 0
    before = load_file(tiny_artifacts / "model" / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not move"
    value_head = load_file(tmp_path / "value_head.safetensors")
    assert value_head["summary.weight"].shape == (1, 64) and value_head["summary.weight"].abs().sum() > 0


def test_ppo_resumes_bit_identically_after_a_crash(tiny_artifacts, reward_model_dir, tmp_path):
    """A run stopped after its first PPO step's checkpoint and resumed ends with the same bytes as one
    that never stopped (rollouts draw from torch's RNG, which the checkpoint restores)."""

    class Stop(BaseException):
        pass

    def stop_at_second_step(step, metrics):
        if step == 1:
            raise Stop

    straight = tmp_path / "straight"
    straight.mkdir()
    run_ppo(tiny_artifacts, straight, reward_model_dir, strategy="lora")
    checkpoints, resumed = tmp_path / "checkpoints", tmp_path / "resumed"
    resumed.mkdir()
    with pytest.raises(Stop):
        run_ppo(tiny_artifacts, resumed, reward_model_dir, strategy="lora", checkpoint_every=1,
                step_logger=stop_at_second_step, checkpoint_dir=checkpoints)
    steps_run = []
    run_ppo(tiny_artifacts, resumed, reward_model_dir, strategy="lora", checkpoint_every=1,
            checkpoint_dir=checkpoints, step_logger=lambda step, metrics: steps_run.append(step))
    assert steps_run == [1]  # it resumed after the first PPO step rather than starting over
    for name in ("model.safetensors", "value_head.safetensors"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name


def test_ppo_needs_a_reward(tiny_artifacts, tmp_path):
    with pytest.raises(StageError, match="needs a reward model"):
        run_ppo(tiny_artifacts, tmp_path)


def test_ppo_refuses_a_model_that_is_not_a_reward_model(tiny_artifacts, tmp_path):
    with pytest.raises(StageError, match="is not a reward model"):
        run_ppo(tiny_artifacts, tmp_path, reward_model=tiny_artifacts / "model")
