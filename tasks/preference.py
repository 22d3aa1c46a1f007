"""Preference-optimization stage kinds: dpo, ipo, simpo, cpo, orpo (pairs) and kto (unpaired).

Each kind is the shared training params plus its objective's hyperparameters; the losses live in
:mod:`tunegraph.training.objectives` (formulas, papers, and their checks against TRL).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.fused_head import check_fused_head
from tunegraph.training.objectives import get_objective
from tunegraph.training.params import TrainingParams
from tunegraph.training.preference import encode_preference_rows, make_preference_step, reference_logps
from tunegraph.training.session import check_encoded, load_trainable, save_trained, train_and_summarize


class DPOParams(TrainingParams):
    beta: float = Field(0.1, gt=0, description="KL strength: larger keeps the policy closer to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: probability a preference is flipped")


class IPOParams(TrainingParams):
    beta: float = Field(0.1, gt=0, description="tau: the target log-ratio margin is 1/(2 tau)")


class SimPOParams(TrainingParams):
    beta: float = Field(2.0, gt=0, description="reward scale on average log-probs")
    gamma: float = Field(1.0, ge=0, description="target reward margin")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class CPOParams(TrainingParams):
    beta: float = Field(0.1, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of the NLL (behaviour cloning) term on chosen")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class ORPOParams(TrainingParams):
    lam: float = Field(0.1, gt=0, description="weight of the odds-ratio term added to SFT on chosen")


class KTOParams(TrainingParams):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U")


PARAMS = {"dpo": DPOParams, "ipo": IPOParams, "simpo": SimPOParams, "cpo": CPOParams, "orpo": ORPOParams,
          "kto": KTOParams}


def objective_hyperparameters(params: TrainingParams) -> dict:
    """The params fields that belong to the objective, not to the shared training settings."""
    own = set(type(params).model_fields) - set(TrainingParams.model_fields)
    return {name: getattr(params, name) for name in sorted(own)}


def train_preference(name: str, params: TrainingParams, inputs: dict[str, Path], out: Path,
                     ctx: StageContext) -> StageResult:
    objective = get_objective(name)
    model, tokenizer = load_trainable(inputs["model"], params, ctx)
    if params.kernels:
        check_fused_head(model, ctx.stage, softcap_supported=False)
    data = encode_preference_rows(tokenizer, read_rows(inputs["dataset"]), objective, params.max_length, ctx)
    check_encoded(data.first + data.second, params, ctx, what="sequences")
    reference = None
    if objective.needs_reference:
        ctx.info("computing reference log-probs with the initial policy")
        reference = tuple(reference_logps(model, examples, tokenizer.pad_token_id, objective.average_logps,
                                          fused=params.kernels) for examples in (data.first, data.second))
    step = make_preference_step(objective, data, objective_hyperparameters(params), tokenizer.pad_token_id, reference,
                                fused=params.kernels)
    result = train_and_summarize(model, len(data.first), step, params, ctx)
    save_trained(model, tokenizer, params, out)
    return result


def _register(name: str) -> None:
    objective = get_objective(name)

    def run(params, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
        return train_preference(name, params, inputs, out, ctx)

    run.__name__ = name
    run.__doc__ = f"{name.upper()} on {'preference pairs' if objective.batch == 'pairs' else 'unpaired feedback'} " \
                  f"({objective.paper})."
    metrics = ("train_loss", "reward_accuracy") if objective.batch == "pairs" else ("train_loss", "kl")
    stage(name, params=PARAMS[name], produces="model",
          inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",))), summary_metrics=metrics)(run)


for _name in PARAMS:
    _register(_name)
