"""Verifiable-task accuracy: pass@1 of greedy answers and the unbiased pass@k of sampled ones.

A completion is *correct* when the weighted mean of the recipe's reward functions (the same ones GRPO
trains with, e.g. ``numeric_match``) reaches 1. With ``n`` samples per problem of which ``c`` are
correct, the unbiased estimator of Chen et al. 2021 (Codex, https://arxiv.org/abs/2107.03374, Eq. 1) is

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]        (k <= n)

computed as a running product to stay exact for large n.
"""

from __future__ import annotations

from typing import Sequence

from tunegraph.rewards import Reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k draws (without replacement) from n samples, c correct, is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def weighted_score(rewards: Sequence[tuple[Reward, float]], completion: str, row: dict) -> float:
    total = sum(weight for _, weight in rewards)
    return sum(weight * reward(completion, row) for reward, weight in rewards) / total


def is_correct(rewards: Sequence[tuple[Reward, float]], completion: str, row: dict) -> bool:
    return weighted_score(rewards, completion, row) >= 1.0 - 1e-9


def pass_at_k_scores(rewards: Sequence[tuple[Reward, float]], samples: list[list[str]], rows: list[dict],
                     ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for each k, from ``samples[i]`` = the completions of ``rows[i]``."""
    correct = [sum(is_correct(rewards, text, row) for text in group) for group, row in zip(samples, rows)]
    return {f"pass@{k}": sum(pass_at_k(len(group), c, k) for group, c in zip(samples, correct)) / len(rows)
            for k in ks}
