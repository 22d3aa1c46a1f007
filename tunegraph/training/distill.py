"""Logit distillation's training parts: the frozen teacher, the tokenizer checks and the loop's step functions.

Each step runs the teacher under ``torch.no_grad`` (in eval mode, its parameters frozen) on the same
micro batch as the student, then the objective of :mod:`tunegraph.training.objectives.distill`:

- :func:`make_logits_step`: one tokenizer; both models read the student's token ids and
  :func:`~tunegraph.training.objectives.distill.distillation_loss` compares their logits;
- :func:`make_fused_step` (``kernels: true``): the same loss from the two LM heads' inputs, without
  either model's ``[B, T, V]`` logits (:func:`tunegraph.kernels.fused_linear_jsd.fused_linear_jsd`, which
  has no tau^2: it is applied here), and the hard-label term by
  :func:`tunegraph.kernels.fused_linear_cross_entropy.fused_linear_cross_entropy`;
- :func:`make_uld_step`: two tokenizers; each model reads its own encoding of the conversation (its own
  chat template) and :func:`~tunegraph.training.objectives.distill.uld_loss` pairs their response
  positions.

The teacher is computed on the fly, micro batch by micro batch: its logits for a whole dataset
(``rows x tokens x vocabulary`` floats) would not fit anywhere. The student is whatever the update
strategy made of it; the step functions only call its forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.training import fused_head
from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample, encode_chat
from tunegraph.training.loop import StepFn, StepOutput, collate
from tunegraph.training.objectives.distill import distillation_loss, uld_loss
from tunegraph.training.params import TrainingParams
from tunegraph.training.session import check_encoded

Pair = tuple[EncodedExample, EncodedExample]  # (student encoding, teacher encoding) of one row


@dataclass(frozen=True)
class KDSettings:
    beta: float  # 0 forward KL, 1 reverse KL, between: generalized JSD
    temperature: float
    alpha: float  # weight of the distillation term; 1 - alpha weighs the hard-label CE


def load_teacher(model_dir: Path, dtype: str):
    """The teacher for inference: eval mode, no parameter requiring grad, in ``dtype`` (float32 or bfloat16);
    a prompt-style adapter artifact gets its adapter (see ``load_with_adapter``)."""
    from tunegraph.training.strategies import load_with_adapter

    teacher = load_with_adapter(model_dir)
    if dtype != "float32":
        teacher = teacher.to(getattr(torch, dtype))
    teacher.requires_grad_(False)
    return teacher.eval()


def vocabulary_difference(student_tokenizer, teacher_tokenizer) -> str | None:
    """None when both tokenizers map the same strings to the same ids, else one example of a difference."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher:
        return None
    token = min(set(student.items()) ^ set(teacher.items()))[0]
    return (f"the student has {len(student)} tokens and the teacher {len(teacher)}; token {token!r} is "
            f"{student.get(token, 'absent')} in the student and {teacher.get(token, 'absent')} in the teacher")


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, stage: str) -> None:
    """``method: logits`` compares distributions index by index: refuse two vocabularies."""
    difference = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if difference is not None:
        raise StageError(f"stage {stage!r}: method: logits needs one tokenizer for student and teacher, but their "
                         f"vocabularies differ ({difference}); use method: uld (cross-tokenizer logit distillation), "
                         f"or sequence-level distillation: a teacher_generate stage feeding sft")


def head_rows(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def shared_width(student, teacher, n_tokens: int, stage: str) -> int:
    """The logit columns both heads have: they may pad the vocabulary differently (e.g. to a multiple of 64);
    every real token must lie within both."""
    student_rows, teacher_rows = head_rows(student), head_rows(teacher)
    width = min(student_rows, teacher_rows)
    if width < n_tokens:
        raise StageError(f"stage {stage!r}: the tokenizer has {n_tokens} tokens but the student's LM head has "
                         f"{student_rows} rows and the teacher's {teacher_rows}; the models do not fit their tokenizer")
    return width


def check_fused_heads(student, teacher, stage: str) -> None:
    """``kernels: true`` reads both heads as one plain weight matrix: no adapter on them, no bias, no softcap
    (the fused divergence has neither)."""
    for role, model in (("student", student), ("teacher", teacher)):
        head = fused_head.check_fused_head(model, stage)
        if head.bias is not None or head.softcap is not None:
            what = "a bias" if head.bias is not None else f"final_logit_softcapping={head.softcap}"
            raise StageError(f"stage {stage!r}: kernels: true has no fused distillation loss for a {role} LM head "
                             f"with {what}; set kernels: false")


def encode_examples(tokenizer, rows: list[dict], params: TrainingParams, ctx: StageContext) -> list[EncodedExample]:
    examples = [encode_chat(tokenizer, row["messages"], params.max_length, row["id"]) for row in rows]
    return check_encoded(examples, params, ctx)


def encode_pairs(student_tokenizer, teacher_tokenizer, rows: list[dict], params: TrainingParams,
                 ctx: StageContext) -> list[Pair]:
    """Each row encoded by both tokenizers (and chat templates); rows where either side has no response
    token within ``max_length`` are dropped."""
    student = [encode_chat(student_tokenizer, row["messages"], params.max_length, row["id"]) for row in rows]
    teacher = [encode_chat(teacher_tokenizer, row["messages"], params.max_length, row["id"]) for row in rows]
    check_encoded(student, params, ctx, "examples (student tokenizer)")  # refuses truncation and label-free data
    check_encoded(teacher, params, ctx, "examples (teacher tokenizer)")
    return [(s, t) for s, t in zip(student, teacher)
            if any(label != IGNORE_INDEX for label in s.labels) and any(label != IGNORE_INDEX for label in t.labels)]


def _output(loss: torch.Tensor, distill: torch.Tensor, ce: torch.Tensor, tokens: int) -> StepOutput:
    return StepOutput(loss, tokens, {"kd_loss": float(distill), "ce_loss": float(ce)})


def make_logits_step(examples: list[EncodedExample], pad_id: int, teacher, width: int, kd: KDSettings) -> StepFn:
    """Student and teacher logits on the same ids; ``distillation_loss`` over the first ``width`` columns."""

    def step(model, indices: list[int]) -> StepOutput:
        batch = collate([examples[i] for i in indices], pad_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits[..., :width]
        student_logits = model(**inputs).logits[..., :width]
        result = distillation_loss(student_logits, teacher_logits, batch["labels"], beta=kd.beta,
                                   temperature=kd.temperature, alpha=kd.alpha)
        return _output(result.loss, result.distill, result.ce, int(batch["attention_mask"].sum()))

    return step


def make_fused_step(examples: list[EncodedExample], pad_id: int, teacher, width: int, kd: KDSettings) -> StepFn:
    """``alpha tau^2 KD + (1 - alpha) CE`` from the final hidden states of both models and their heads.

    Only the rows that predict a response token reach the fused ops, so prompt and padding cost no logits.
    """
    from tunegraph.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy  # imports triton
    from tunegraph.kernels.fused_linear_jsd import fused_linear_jsd

    teacher_head = fused_head.lm_head(teacher)

    def step(model, indices: list[int]) -> StepOutput:
        batch = collate([examples[i] for i in indices], pad_id)
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
        scored = targets != IGNORE_INDEX
        tokens = int(batch["attention_mask"].sum())
        hidden = fused_head.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        if not bool(scored.any()):  # nothing to learn in this batch; keep the graph
            zero = hidden.sum() * 0.0
            return _output(zero, zero.detach(), zero.detach(), tokens)
        head = fused_head.lm_head(model)
        with torch.no_grad():
            teacher_hidden = fused_head.final_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
        divergence = fused_linear_jsd(hidden[scored], head.weight[:width], teacher_hidden[scored],
                                      teacher_head.weight[:width], beta=kd.beta, temperature=kd.temperature)
        with torch.set_grad_enabled(torch.is_grad_enabled() and kd.alpha < 1.0):  # alpha = 1: CE is only logged
            ce = fused_linear_cross_entropy(hidden[scored], head.weight, targets[scored], head.bias,
                                            ignore_index=IGNORE_INDEX, softcap=head.softcap)
        loss = kd.alpha * kd.temperature ** 2 * divergence + (1.0 - kd.alpha) * ce
        return _output(loss, divergence.detach(), ce.detach(), tokens)

    return step


def make_uld_step(pairs: list[Pair], student_pad_id: int, teacher_pad_id: int, teacher, kd: KDSettings) -> StepFn:
    """Each model on its own encoding of the rows; ``uld_loss`` pairs their response positions."""

    def step(model, indices: list[int]) -> StepOutput:
        student_batch = collate([pairs[i][0] for i in indices], student_pad_id)
        teacher_batch = collate([pairs[i][1] for i in indices], teacher_pad_id)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=teacher_batch["input_ids"],
                                     attention_mask=teacher_batch["attention_mask"]).logits
        student_logits = model(input_ids=student_batch["input_ids"],
                               attention_mask=student_batch["attention_mask"]).logits
        result = uld_loss(student_logits, teacher_logits, student_batch["labels"], teacher_batch["labels"],
                          temperature=kd.temperature, alpha=kd.alpha)
        return _output(result.loss, result.distill, result.ce, int(student_batch["attention_mask"].sum()))

    return step
