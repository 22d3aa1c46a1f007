"""RL with verifiable rewards: the ``grpo`` and ``dapo`` stage kinds.

The dataset's rows are prompts with a reference answer (the final assistant message, or an
``answer`` field); ``rewards`` names reward functions (built-in names or ``module:function``) with
weights. Defaults follow the papers: GRPO (DeepSeekMath) with a KL term and sequence-mean loss;
DAPO with clip-higher, token-level loss, dynamic sampling, overlong shaping and no KL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.fused_head import check_fused_head
from tunegraph.training.grpo import PolicySettings, RolloutSettings, make_grpo_step, make_reference
from tunegraph.training.params import TrainingParams
from tunegraph.training.session import load_trainable, save_trained, train_and_summarize


class GRPOParams(TrainingParams):
    rewards: dict[str, float] = Field(default_factory=lambda: {"numeric_match": 1.0},
                                      description="reward function (built-in name or module:function) -> weight")
    group_size: int = Field(4, ge=2, description="completions sampled per prompt")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.04, ge=0, description="KL weight to the reference (initial) policy")
    eps_low: float = Field(0.2, gt=0, lt=1)
    eps_high: float = Field(0.2, gt=0)
    aggregation: Literal["sequence", "token"] = "sequence"
    scale_advantages: bool = Field(True, description="divide by the group's reward std (False: Dr. GRPO)")
    dynamic_sampling: bool = False
    overlong_cache: int | None = Field(None, ge=1, description="DAPO soft overlong penalty window (tokens)")
    batch_size: int = Field(2, ge=1, description="prompts per micro batch (x group_size completions)")


class DAPOParams(GRPOParams):
    beta: float = Field(0.0, ge=0)
    eps_high: float = Field(0.28, gt=0)
    aggregation: Literal["sequence", "token"] = "token"
    dynamic_sampling: bool = True
    overlong_cache: int | None = Field(8, ge=1)


def train_rl(params: GRPOParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    from tunegraph.rewards import resolve_reward

    rewards = [(resolve_reward(spec), weight) for spec, weight in params.rewards.items()]
    model, tokenizer = load_trainable(inputs["model"], params, ctx)
    if params.kernels:
        check_fused_head(model, ctx.stage, softcap_supported=False)
    rows = read_rows(inputs["dataset"])
    rollout = RolloutSettings(params.group_size, params.max_new_tokens, params.temperature, params.top_p)
    policy = PolicySettings(params.beta, params.eps_low, params.eps_high, params.aggregation, params.scale_advantages,
                            params.dynamic_sampling, params.overlong_cache)
    step = make_grpo_step(rows, tokenizer, rewards, rollout, policy, make_reference(model, params.beta),
                          fused=params.kernels)
    result = train_and_summarize(model, len(rows), step, params, ctx)
    save_trained(model, tokenizer, params, out)
    # completions a reward function failed on (scored 0) or scored outside [0, 1]: counted, not fatal
    reward_counts = {}
    for index, (reward, _) in enumerate(rewards):
        reward_counts.update(reward.stats.as_metrics(f"reward{index}"))
    return StageResult(metrics={**result.metrics, **reward_counts}, timings=result.timings)


@stage("grpo", params=GRPOParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",))),
       summary_metrics=("reward", "train_loss"))
def grpo(params: GRPOParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """GRPO with verifiable rewards (https://arxiv.org/abs/2402.03300)."""
    return train_rl(params, inputs, out, ctx)


@stage("dapo", params=DAPOParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",))),
       summary_metrics=("reward", "train_loss"))
def dapo(params: DAPOParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """DAPO: GRPO with clip-higher, token-level loss, dynamic sampling, overlong shaping (https://arxiv.org/abs/2503.14476)."""
    return train_rl(params, inputs, out, ctx)
