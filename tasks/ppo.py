"""The ``ppo`` stage kind: PPO-RLHF against a reward model (and/or verifiable rewards).

Inputs: the policy model, a prompts dataset (any chat rows: a final assistant message is taken as
the reference answer that verifiable rewards compare against, never shown to the policy), and a
reward model from the ``reward_model`` stage. Defaults follow TRL's PPO config and Huang et al. 2024
(https://arxiv.org/abs/2403.17031); the algorithm is in :mod:`tunegraph.training.ppo`, the losses in
:mod:`tunegraph.training.objectives.ppo`, the value head in :mod:`tunegraph.training.value_head`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from safetensors.torch import save_file

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.modelio import load_tokenizer
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.grpo import RolloutSettings, make_reference
from tunegraph.training.params import TrainingParams
from tunegraph.training.ppo import PPOSettings, collect_experience, make_scorer, train_ppo
from tunegraph.training.reward_model import load_reward_model, score_weight
from tunegraph.training.session import load_trainable, save_trained, summary_result
from tunegraph.training.strategies import neftune
from tunegraph.training.value_head import PolicyWithValue, ValueHead, init_value_head

VALUE_HEAD_FILE = "value_head.safetensors"


class PPOParams(TrainingParams):
    rewards: dict[str, float] = Field(default_factory=dict,
                                      description="verifiable rewards added to the reward model's score: "
                                                  "reward function (built-in name or module:function) -> weight")
    batch_size: int = Field(8, ge=1, description="prompts per PPO step (one sampled completion each)")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="beta: per-token KL penalty to the reference (initial) policy")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="k1 = log pi - log pi_ref; k3 = Schulman's >= 0 form")
    cliprange: float = Field(0.2, gt=0, lt=1, description="policy ratio clip epsilon")
    cliprange_value: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, gt=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per pass over a rollout")
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(None, ge=0, description="subtracted from the score of completions "
                                                                      "that hit max_new_tokens without EOS")
    value_init: Literal["auto", "reward_head", "zero"] = Field(
        "auto", description="value head start: the reward model's score head (when widths match) or zero; "
                            "auto: the former when possible")


def _value_head(params: PPOParams, policy, reward_model, ctx: StageContext) -> ValueHead:
    head = ValueHead(policy.config.hidden_size)
    score = score_weight(reward_model) if reward_model is not None and params.value_init != "zero" else None
    chosen = init_value_head(head, score)
    if params.value_init == "reward_head" and chosen != "reward_head":
        raise StageError(f"stage {ctx.stage!r}: value_init 'reward_head' needs a reward model whose hidden size "
                         f"equals the policy's ({policy.config.hidden_size}); use value_init: zero")
    ctx.info(f"value head initialised from: {chosen}")
    return head


def _check_inputs(params: PPOParams, inputs: dict[str, Path], tokenizer, ctx: StageContext) -> None:
    if "reward_model" not in inputs and not params.rewards:
        raise StageError(f"stage {ctx.stage!r}: ppo needs a reward model (input 'reward_model') or verifiable "
                         f"rewards (params 'rewards'), or both")
    if "reward_model" in inputs and load_tokenizer(inputs["reward_model"]).get_vocab() != tokenizer.get_vocab():
        raise StageError(f"stage {ctx.stage!r}: the reward model's tokenizer differs from the policy's; it scores "
                         f"the policy's token ids, so train it from the same base model")


@stage("ppo", params=PPOParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",)),
               InputSlot("reward_model", ("model",), optional=True)),
       summary_metrics=("reward", "kl", "train_loss"))
def ppo(params: PPOParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """PPO-RLHF: clipped policy and value losses, GAE, KL-shaped rewards (https://arxiv.org/abs/2203.02155)."""
    from tunegraph.rewards import resolve_reward

    rewards = [(resolve_reward(spec), weight) for spec, weight in params.rewards.items()]
    policy, tokenizer = load_trainable(inputs["model"], params, ctx)
    _check_inputs(params, inputs, tokenizer, ctx)
    reward_model = load_reward_model(inputs["reward_model"], ctx.stage) if "reward_model" in inputs else None
    rows = read_rows(inputs["dataset"])
    reference = make_reference(policy, params.kl_coef)  # the initial policy, before any update
    model = PolicyWithValue(policy, _value_head(params, policy, reward_model, ctx))

    settings = PPOSettings(params.kl_coef, params.kl_estimator, params.cliprange, params.cliprange_value,
                           params.vf_coef, params.gamma, params.lam, params.ppo_epochs, params.num_minibatches,
                           params.whiten_rewards, params.missing_eos_penalty)
    rollout = RolloutSettings(1, params.max_new_tokens, params.temperature, params.top_p)
    scorer = make_scorer(reward_model, rewards, tokenizer.pad_token_id)

    def collect(batch_rows: list[dict]):
        return collect_experience(model, tokenizer, batch_rows, scorer, rollout, settings, reference)

    with neftune(policy, params.neftune_alpha):  # the noise hook exists only while training
        summary = train_ppo(model, rows, collect, settings, params.loop_settings(), ctx, params.make_optimizer(),
                            {"rollout": [params.max_new_tokens, params.temperature, params.top_p],
                             "rewards": params.rewards, "value_init": params.value_init})
    result = summary_result(summary, len(rows))
    save_trained(policy, tokenizer, params, out)
    save_file({name: tensor.detach().contiguous() for name, tensor in model.value_head.state_dict().items()},
              out / VALUE_HEAD_FILE)
    reward_counts = {}
    for index, (reward, _) in enumerate(rewards):  # reward-function failures scored 0: counted, not fatal
        reward_counts.update(reward.stats.as_metrics(f"reward{index}"))
    return StageResult(metrics={**result.metrics, **reward_counts}, timings=result.timings)
