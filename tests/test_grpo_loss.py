"""GRPO/DAPO loss pieces against hand-computed values."""

import math

import torch
from torch.testing import assert_close

from tunegraph.training.objectives.grpo import (clipped_policy_loss, group_advantages, informative_groups, k3_kl,
                                                overlong_penalty)


def test_group_advantages_are_normalized_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased, as torch and TRL use
    assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert_close(adv[4:], torch.zeros(4))
    assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_dynamic_sampling_drops_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert informative_groups(rewards, 2).tolist() == [False, True, False]


def test_overlong_penalty_is_zero_then_linear_then_minus_one():
    lengths = torch.tensor([10, 16, 18, 20, 21])
    assert_close(overlong_penalty(lengths, max_len=20, cache=4), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_k3_kl_is_zero_at_reference_and_positive_elsewhere():
    logps = torch.log(torch.tensor([0.5, 0.2]))
    assert_close(k3_kl(logps, logps), torch.zeros(2))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    expected = torch.tensor([0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1])
    assert_close(k3_kl(logps, ref), expected)


def test_on_policy_loss_value_and_gradient():
    """With old = current (detached) the ratio is 1: loss = -mean A, gradient = -A * grad log pi / |o|."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    loss, metrics = clipped_policy_loss(logps, logps.detach(), adv, mask, aggregation="sequence")
    assert_close(loss, torch.tensor((-1.0 + 2.0) / 2))
    loss.backward()
    assert_close(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert metrics["clip_fraction"] == 0


def test_token_level_aggregation_weighs_long_completions_more():
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    loss, _ = clipped_policy_loss(logps, logps.detach(), adv, mask, aggregation="token")
    loss.backward()
    assert_close(logps.grad, torch.tensor([[-0.25, 0.0, 0.0], [-0.25, -0.25, -0.25]]))


def test_clip_higher_bounds_the_ratio_asymmetrically():
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    positive, m = clipped_policy_loss(logps, old, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.28)
    # A > 0: min(1.5, 1.28) = 1.28 and min(0.5, 0.8) = 0.5 -> loss = -(1.28 + 0.5) / 2
    assert_close(positive, torch.tensor(-(1.28 + 0.5) / 2))
    negative, _ = clipped_policy_loss(logps, old, torch.tensor([-1.0]), mask, eps_low=0.2, eps_high=0.28)
    # A < 0: -min(-1.5, -1.28) = 1.5 and -min(-0.5, -0.8) = 0.8
    assert_close(negative, torch.tensor((1.5 + 0.8) / 2))
    assert m["clip_fraction"] == 1


def test_kl_penalty_is_added_per_token():
    logps = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, metrics = clipped_policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1, ref_logps=ref)
    assert_close(loss, torch.tensor(0.1 * (0.5 - math.log(0.5) - 1)))
    assert_close(metrics["kl"], torch.tensor(0.5 - math.log(0.5) - 1))
