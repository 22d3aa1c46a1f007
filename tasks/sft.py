"""Supervised fine-tuning: next-token loss on assistant turns only.

    L_SFT(theta) = - sum_i sum_t log p_theta(y_{i,t} | x_i, y_{i,<t})

Prompt tokens are masked (label -100); the end-of-turn token is learned so the model stops
(Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; the seed survey's SFT section).
The output is a full model directory: with LoRA the update is merged (W0 + alpha/r B A), and the
adapter is kept under ``adapter/`` for stages that want it alone. With ``kernels: true`` the loss is
the same mean over labelled tokens, computed from the LM head's input in chunks
(:func:`tunegraph.training.fused_head.causal_lm_loss`).
"""

from __future__ import annotations

from pathlib import Path

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.fused_head import causal_lm_loss, check_fused_head
from tunegraph.training.loop import StepOutput, collate
from tunegraph.training.params import TrainingParams
from tunegraph.training.session import check_encoded, load_trainable, save_trained, train_and_summarize
from tunegraph.training.chat_encoding import encode_chat


class SFTParams(TrainingParams):
    """SFT has no objective-specific hyperparameters beyond the shared training params."""


@stage("sft", params=SFTParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",))),
       summary_metrics=("train_loss", "steps"))
def sft(params: SFTParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Fine-tune a model on chat data (loss on assistant turns)."""
    model, tokenizer = load_trainable(inputs["model"], params, ctx)
    if params.kernels:
        check_fused_head(model, ctx.stage)
    examples = [encode_chat(tokenizer, row["messages"], params.max_length, row["id"])
                for row in read_rows(inputs["dataset"])]
    examples = check_encoded(examples, params, ctx)

    def step(model, indices: list[int]) -> StepOutput:
        batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
        loss = causal_lm_loss(model, batch) if params.kernels else model(**batch).loss
        return StepOutput(loss, int(batch["attention_mask"].sum()))

    result = train_and_summarize(model, len(examples), step, params, ctx)
    save_trained(model, tokenizer, params, out)
    return result
