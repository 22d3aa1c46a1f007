"""The ``reward_model`` stage kind: a scalar reward head trained on preference pairs (Bradley–Terry).

Reads the same prompt/chosen/rejected rows as DPO, loads the model with its LM head replaced by a
scalar score head, trains under any update strategy (the head always trains in full), and writes a
model directory that ``ppo`` reloads as its reward model (``reward_model.json`` marks it). The loss,
its papers and its check against TRL are in :mod:`tunegraph.training.objectives.reward_model`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.params import TrainingParams
from tunegraph.training.reward_model import (encode_pairs, make_reward_step, pairwise_metrics,
                                             write_reward_marker)
from tunegraph.training.session import check_encoded, load_trainable, save_trained, train_and_summarize


class RewardModelParams(TrainingParams):
    margin: float = Field(0.0, ge=0, description="required score margin r(chosen) - r(rejected) inside the loss")
    center_rewards_coefficient: float | None = Field(
        None, gt=0, description="TRL's centering term c * mean((r_chosen + r_rejected)^2); 0.01 is usual")


@stage("reward_model", params=RewardModelParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",)),
               InputSlot("held_out", ("dataset",), optional=True)),
       summary_metrics=("train_loss", "train_accuracy", "held_out_accuracy"))
def reward_model(params: RewardModelParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Train a Bradley–Terry reward model on preference pairs (https://arxiv.org/abs/2203.02155)."""
    model, tokenizer = load_trainable(inputs["model"], params, ctx, head="score")
    data = encode_pairs(tokenizer, read_rows(inputs["dataset"]), params.max_length, ctx)
    check_encoded(data.chosen + data.rejected, params, ctx, what="sequences")
    step = make_reward_step(data, tokenizer.pad_token_id, params.margin, params.center_rewards_coefficient)
    result = train_and_summarize(model, len(data.chosen), step, params, ctx)
    # accuracy and margin of the trained model over every pair (the loop's figures are per-step, mid-training)
    metrics = {f"train_{k}": v for k, v in pairwise_metrics(model, data, tokenizer.pad_token_id).items()}
    if "held_out" in inputs:
        held_out = encode_pairs(tokenizer, read_rows(inputs["held_out"]), params.max_length, ctx)
        metrics |= {f"held_out_{k}": v for k, v in pairwise_metrics(model, held_out, tokenizer.pad_token_id).items()}
    save_trained(model, tokenizer, params, out)
    write_reward_marker(out, params.margin, params.center_rewards_coefficient)
    return StageResult(metrics={**result.metrics, **metrics}, timings=result.timings)
