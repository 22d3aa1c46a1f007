"""The parts every training stage shares: load and wrap the model, check the encoded data, run the
loop, save the result, report metrics."""

from __future__ import annotations

from pathlib import Path

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.modelio import load_model, load_tokenizer, save_model
from tunegraph.registry import StageResult
from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample
from tunegraph.training.loop import StepFn, train
from tunegraph.training.params import TrainingParams
from tunegraph.training.strategies import apply_strategy, export_trained, save_adapter


def load_trainable(model_dir: Path, params: TrainingParams, ctx: StageContext):
    """(model wrapped by the update strategy, tokenizer)."""
    tokenizer = load_tokenizer(model_dir)
    model = apply_strategy(load_model(model_dir), params.strategy, params.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.info(f"strategy {params.strategy}: {trainable:,} trainable parameters")
    return model, tokenizer


def check_encoded(examples: list[EncodedExample], params: TrainingParams, ctx: StageContext,
                  what: str = "examples") -> list[EncodedExample]:
    """Refuse silent truncation and data with nothing to learn; drop examples with no labels."""
    truncated = sum(e.truncated for e in examples) / max(len(examples), 1)
    if truncated > params.max_truncated_fraction:
        raise StageError(f"stage {ctx.stage!r}: {truncated:.0%} of {what} exceed max_length={params.max_length} "
                         f"tokens and would be cut; raise max_length or max_truncated_fraction")
    usable = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not usable:
        raise StageError(f"stage {ctx.stage!r}: every example's labels are masked (no assistant tokens within "
                         f"max_length={params.max_length}); raise max_length or check the data")
    return usable


def train_and_summarize(model, n_examples: int, step: StepFn, params: TrainingParams,
                        ctx: StageContext) -> StageResult:
    summary = train(model, n_examples, step, params.loop_settings(), ctx)
    metrics = {"train_loss": summary.final_loss, "first_loss": summary.first_loss, "steps": summary.steps,
               "examples": n_examples, "tokens": summary.tokens, **summary.final_metrics}
    return StageResult(metrics=metrics, timings={"train_seconds": summary.seconds,
                                                 "tokens_per_s": summary.tokens / max(summary.seconds, 1e-9)})


def save_trained(model, tokenizer, params: TrainingParams, out: Path) -> None:
    """The full model (adapter merged) at the top of ``out``; a LoRA adapter also under ``adapter/``."""
    if params.strategy == "lora":
        save_adapter(model, out / "adapter")
    save_model(export_trained(model, params.strategy), tokenizer, out)
