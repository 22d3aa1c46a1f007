"""Supervised fine-tuning: next-token loss on assistant turns only.

    L_SFT(theta) = - sum_i sum_t log p_theta(y_{i,t} | x_i, y_{i,<t})

Prompt tokens are masked (label -100); the end-of-turn token is learned so the model stops
(Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; the seed survey's SFT section).
The output is a full model directory: with LoRA the update is merged (W0 + alpha/r B A), and the
adapter is kept under ``adapter/`` for stages that want it alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.modelio import load_model, load_tokenizer, save_model
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.chat_encoding import IGNORE_INDEX, encode_chat
from tunegraph.training.loop import LoopSettings, train
from tunegraph.training.strategies import LoraSettings, Strategy, apply_strategy, export_trained, save_adapter


class SFTParams(StageParams):
    strategy: Strategy = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8, description="tokens; longer examples are truncated")
    max_truncated_fraction: float = Field(0.05, ge=0, le=1,
                                          description="refuse the data if more examples than this are truncated")


def encode_dataset(tokenizer, rows: list[dict], params: SFTParams, ctx: StageContext):
    examples = [encode_chat(tokenizer, row["messages"], params.max_length, row["id"]) for row in rows]
    truncated = sum(e.truncated for e in examples) / len(examples)
    if truncated > params.max_truncated_fraction:
        raise StageError(f"stage {ctx.stage!r}: {truncated:.0%} of examples exceed max_length={params.max_length} "
                         f"tokens and would be cut; raise max_length or max_truncated_fraction")
    usable = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not usable:
        raise StageError(f"stage {ctx.stage!r}: every example's labels are masked (no assistant tokens within "
                         f"max_length={params.max_length}); raise max_length or check the data")
    return usable


@stage("sft", params=SFTParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",))),
       summary_metrics=("train_loss", "steps"))
def sft(params: SFTParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Fine-tune a model on chat data (loss on assistant turns)."""
    tokenizer = load_tokenizer(inputs["model"])
    examples = encode_dataset(tokenizer, read_rows(inputs["dataset"]), params, ctx)
    model = apply_strategy(load_model(inputs["model"]), params.strategy, params.lora)
    ctx.info(f"{len(examples)} examples, strategy {params.strategy}, "
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    settings = LoopSettings(params.epochs, params.batch_size, params.grad_accum, params.learning_rate,
                            params.warmup_ratio, params.weight_decay, params.max_grad_norm, params.max_steps)
    summary = train(model, examples, settings, ctx, tokenizer.pad_token_id)
    if params.strategy == "lora":
        save_adapter(model, out / "adapter")
    save_model(export_trained(model, params.strategy), tokenizer, out)
    return StageResult(
        metrics={"train_loss": summary.final_loss, "first_loss": summary.first_loss, "steps": summary.steps,
                 "examples": len(examples), "tokens": summary.tokens},
        timings={"train_seconds": summary.seconds, "tokens_per_s": summary.tokens / max(summary.seconds, 1e-9)},
    )
