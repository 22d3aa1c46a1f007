"""Stage kind ``distill``: train a student on a teacher's next-token distributions over chat data.

    method: logits   L = alpha * tau^2 * D_beta(p_T^tau || p_S^tau) + (1 - alpha) * CE     (one tokenizer)
    method: uld      L = alpha * W(sorted p_S^tau, sorted p_T^tau) + (1 - alpha) * CE      (two tokenizers)

over the response (assistant) tokens of each row: ``D_beta`` is forward KL (``beta: 0``, Hinton et al.
2015, https://arxiv.org/abs/1503.02531), reverse KL (``beta: 1``) or the generalized JSD of GKD (Agarwal
et al. 2024, https://arxiv.org/abs/2306.13649); ``W`` is Universal Logit Distillation's distance
(Boizard et al. 2024, https://arxiv.org/abs/2402.12030). The formulas, the alignment ULD uses and the
check of the seed survey's L_KD are in :mod:`tunegraph.training.objectives.distill`.

``method: logits`` refuses a teacher whose tokenizer differs from the student's (the distributions are
compared token id by token id); use ``method: uld``, or sequence-level distillation, which works across
any two models: a ``teacher_generate`` stage whose dataset feeds ``sft`` (Kim & Rush 2016,
https://arxiv.org/abs/1606.07947). The teacher runs under ``torch.no_grad`` in eval mode, in
``teacher_dtype``. The student trains under any update strategy, like every training stage; with
``kernels: true`` the ``logits`` loss is computed from the two LM heads' inputs without their logits
(:func:`tunegraph.kernels.fused_linear_jsd.fused_linear_jsd`); ULD sorts whole distributions, so it
reads logits either way. A typical student is a ``shrink_model`` of the teacher (same tokenizer).

Metrics: ``kd_loss`` (the divergence or ULD distance, before alpha and tau^2) and ``ce_loss`` (the
student's hard-label cross-entropy), besides the loss every training stage reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.modelio import load_tokenizer
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.distill import (KDSettings, check_fused_heads, check_same_vocabulary, encode_examples,
                                        encode_pairs, load_teacher, make_fused_step, make_logits_step, make_uld_step,
                                        shared_width)
from tunegraph.training.params import TrainingParams
from tunegraph.training.session import load_trainable, save_trained, train_and_summarize


class DistillParams(TrainingParams):
    method: Literal["logits", "uld"] = Field("logits", description="logits: one shared tokenizer (KL/JSD); uld: "
                                                                   "teacher and student tokenizers differ")
    beta: float = Field(0.0, ge=0, le=1, description="logits: 0 forward KL, 1 reverse KL, in between the "
                                                     "generalized JSD of GKD")
    temperature: float = Field(1.0, gt=0, description="softmax temperature tau of both distributions")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; 1 - alpha weighs the "
                                                      "hard-label cross-entropy (1: pure distillation)")
    teacher_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the teacher runs in")

    @model_validator(mode="after")
    def _beta_is_for_logits(self) -> "DistillParams":
        if self.method == "uld" and self.beta != 0.0:
            raise ValueError("beta chooses the KL/JSD of method: logits; ULD has one distance (leave beta out)")
        return self


@stage("distill", params=DistillParams, produces="model",
       inputs=(InputSlot("student", ("model",)), InputSlot("teacher", ("model",)),
               InputSlot("dataset", ("dataset",))),
       summary_metrics=("train_loss", "kd_loss", "steps"))
def distill(params: DistillParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Distill the teacher into the student on the dataset's assistant turns."""
    kd = KDSettings(params.beta, params.temperature, params.alpha)
    rows = read_rows(inputs["dataset"])
    # tokenizers first: a mismatch is refused before any model is loaded
    teacher_tokenizer = _teacher_tokenizer(inputs, params, ctx)
    model, tokenizer = load_trainable(inputs["student"], params, ctx)
    teacher = load_teacher(inputs["teacher"], params.teacher_dtype)
    if params.method == "uld":
        pairs = encode_pairs(tokenizer, teacher_tokenizer, rows, params, ctx)
        step = make_uld_step(pairs, tokenizer.pad_token_id, teacher_tokenizer.pad_token_id, teacher, kd)
        n_examples = len(pairs)
    else:
        examples = encode_examples(tokenizer, rows, params, ctx)
        width = shared_width(model, teacher, len(tokenizer), ctx.stage)
        if params.kernels:
            check_fused_heads(model, teacher, ctx.stage)
        make_step = make_fused_step if params.kernels else make_logits_step
        step = make_step(examples, tokenizer.pad_token_id, teacher, width, kd)
        n_examples = len(examples)
    result = train_and_summarize(model, n_examples, step, params, ctx)
    save_trained(model, tokenizer, params, out)
    return result


def _teacher_tokenizer(inputs: dict[str, Path], params: DistillParams, ctx: StageContext):
    """uld: the teacher's tokenizer with its chat template (it encodes the rows itself). logits: the teacher
    reads the student's ids, so its tokenizer is only checked to be the same vocabulary."""
    if params.method == "uld":
        return load_tokenizer(inputs["teacher"])
    from transformers import AutoTokenizer

    teacher_tokenizer = AutoTokenizer.from_pretrained(inputs["teacher"])
    check_same_vocabulary(load_tokenizer(inputs["student"]), teacher_tokenizer, ctx.stage)
    return teacher_tokenizer
