"""Verifiable rewards (RLVR) for GRPO/DAPO training and evaluation.

``resolve_reward(spec)`` turns a recipe's reward spec (a built-in name or
``package.module:function``, optionally with ``(key=literal, ...)`` settings) into a
:class:`Reward`, a ``fn(completion, row) -> float`` in [0, 1] that never raises for a malformed
completion. Built-ins: ``numeric_match``, ``exact_match``, ``regex_match``, ``json_schema``,
``format_tags``, ``code_tests`` (the latter runs code in :mod:`tunegraph.rewards.sandbox`).
"""

from tunegraph.rewards.base import (
                                    Reward,
                                    RewardFn,
                                    RewardStats,
                                    builtin_reward,
                                    builtin_rewards,
                                    parse_reward_spec,
                                    reference_answer,
                                    resolve_reward,
)

__all__ = ["Reward", "RewardFn", "RewardStats", "builtin_reward", "builtin_rewards", "parse_reward_spec",
           "reference_answer", "resolve_reward"]
