"""Supervised fine-tuning: next-token loss on assistant turns only.

    L_SFT(theta) = - sum_i sum_t log p_theta(y_{i,t} | x_i, y_{i,<t})

Prompt tokens are masked (label -100); the end-of-turn token is learned so the model stops
(Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; the seed survey's SFT section). Before training,
data whose assistant turns end without a labelled EOS token is refused
(:func:`tunegraph.training.session.check_stopping`).
The output is a full model directory: with LoRA the update is merged (W0 + alpha/r B A), and the
adapter is kept under ``adapter/`` for stages that want it alone. With ``kernels: true`` the loss is
the same mean over labelled tokens, computed from the LM head's input in chunks
(:func:`tunegraph.training.fused_head.causal_lm_loss`). With ``packing: true`` several examples share one
sequence of at most ``max_length`` tokens, each attending only to itself (:mod:`tunegraph.training.packing`);
``batch_size`` then counts packed sequences.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.fused_head import causal_lm_loss, check_fused_head
from tunegraph.training.loop import StepOutput, collate
from tunegraph.training.packing import UNPACKABLE_STRATEGIES, collate_packed, pack_examples, packed_loss
from tunegraph.training.params import TrainingParams
from tunegraph.training.session import (check_encoded, check_stopping, load_trainable, save_trained,
                                        train_and_summarize)
from tunegraph.training.chat_encoding import encode_chat


class SFTParams(TrainingParams):
    packing: bool = Field(False, description="pack several examples into each sequence of max_length tokens "
                                             "(best-fit decreasing; batch_size counts packed sequences); position "
                                             "ids restart per example, so no attention crosses examples (sdpa, "
                                             "eager and flash-attention); not with prefix_tuning, prompt_tuning "
                                             "or p_tuning")


@stage("sft", params=SFTParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",))),
       summary_metrics=("train_loss", "steps"))
def sft(params: SFTParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Fine-tune a model on chat data (loss on assistant turns)."""
    if params.packing and params.strategy in UNPACKABLE_STRATEGIES:
        raise StageError(f"stage {ctx.stage!r}: packing: true cannot keep packed examples apart under "
                         f"{params.strategy} (its virtual tokens ignore the per-example position ids); set "
                         f"packing: false or use another strategy")
    model, tokenizer = load_trainable(inputs["model"], params, ctx)
    if params.kernels:
        check_fused_head(model, ctx.stage)
    rows = read_rows(inputs["dataset"])
    encoded = [encode_chat(tokenizer, row["messages"], params.max_length, row["id"]) for row in rows]
    examples = check_encoded(encoded, params, ctx)
    check_stopping(encoded, [row["id"] for row in rows], tokenizer, params, ctx)

    if params.packing:
        packed = pack_examples(examples, params.max_length)
        tokens = sum(len(e.input_ids) for e in examples)
        ctx.info(f"packing: {len(examples)} examples into {len(packed)} sequences of at most {params.max_length} "
                 f"tokens ({tokens / (len(packed) * params.max_length):.0%} filled)")

        def step(model, indices: list[int]) -> StepOutput:
            batch = collate_packed([packed[i] for i in indices], tokenizer.pad_token_id)
            loss = causal_lm_loss(model, batch) if params.kernels else packed_loss(model, batch)
            return StepOutput(loss, sum(len(e.input_ids) for i in indices for e in packed[i]))

        result = train_and_summarize(model, len(packed), step, params, ctx)
        result.metrics.update(examples=len(examples), packed_sequences=len(packed))
    else:
        def step(model, indices: list[int]) -> StepOutput:
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            loss = causal_lm_loss(model, batch) if params.kernels else model(**batch).loss
            return StepOutput(loss, int(batch["attention_mask"].sum()))

        result = train_and_summarize(model, len(examples), step, params, ctx)
    save_trained(model, tokenizer, params, out)
    return result
