"""The parts every training stage shares: load and wrap the model, check the encoded data, run the
loop, save the result, report metrics."""

from __future__ import annotations

from pathlib import Path

from tunegraph.context import StageContext
from tunegraph.errors import StageError, TunegraphError
from tunegraph.modelio import load_tokenizer
from tunegraph.registry import StageResult
from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample
from tunegraph.training.loop import StepFn, TrainSummary, train
from tunegraph.training.params import TrainingParams
from tunegraph.training.strategies import apply_strategy, describe_strategy, load_base, neftune, save_trained_model
from tunegraph.training.strategies.heads import Head


def load_trainable(model_dir: Path, params: TrainingParams, ctx: StageContext, head: Head = "causal_lm"):
    """(model wrapped by the update strategy, tokenizer); ``head="score"`` loads a reward model."""
    tokenizer = load_tokenizer(model_dir)
    settings = params.strategy_settings()
    model = apply_strategy(load_base(model_dir, params.strategy, settings, head), params.strategy, settings,
                           model_dir=model_dir)
    ctx.info(describe_strategy(model, params.strategy))
    if params.kernels:
        patch_kernels(model, ctx)
    return model, tokenizer


def patch_kernels(model, ctx: StageContext) -> None:
    """``kernels: true``: fused RMSNorm, RoPE and SwiGLU/GeGLU forwards on the (strategy-wrapped) model, see
    :mod:`tunegraph.kernels.patching`. The fused LM-head losses are the stage's step function's part."""
    from tunegraph.kernels.patching import apply_kernels  # imports triton: only when asked for

    try:
        patched = apply_kernels(model)
    except TunegraphError as error:
        raise StageError(f"stage {ctx.stage!r}: {error}") from None
    ctx.info(f"kernels: {'; '.join(patched) or 'nothing to patch'}")


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


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The contiguous runs of labelled tokens: one per assistant turn of an encoded conversation."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def check_stopping(examples: list[EncodedExample], row_ids: list[str], tokenizer, params: TrainingParams,
                   ctx: StageContext) -> None:
    """Refuse SFT data that would unlearn stopping: assistant turns whose end-of-turn token is unlabelled.

    Generation stops at the tokenizer's EOS token e, so SFT must put its loss -log p(e | x, y) after every
    reply. A labelled assistant turn without e teaches the model that the reply goes on. Refused: a
    turn that ends without a labelled e in an example that was NOT truncated (the chat template puts no
    e after the reply, or labels it as part of the prompt), and data where truncation cuts e from every
    example (none would teach stopping). A truncated example's last turn may lose e (counted by
    ``max_truncated_fraction``). pad == eos is fine here, as :func:`~tunegraph.training.loop.collate`
    masks padding by position, not by id; it is noted on one info line."""
    eos = tokenizer.eos_token_id
    token = tokenizer.convert_ids_to_tokens(eos) if eos is not None else None
    if eos is not None and tokenizer.pad_token_id == eos:
        ctx.info(f"pad token = eos token {token!r}: padding is masked by position, so each assistant turn's "
                 f"{token!r} keeps its label")
    taught = 0
    for example, row_id in zip(examples, row_ids):
        runs = labelled_runs(example.labels)
        if not runs:
            continue  # nothing to learn: dropped by check_encoded
        checked = runs[:-1] if example.truncated else runs
        if eos is None or any(eos not in run for run in checked):
            raise StageError(f"stage {ctx.stage!r}: row {row_id!r}: an assistant turn ends without a labelled "
                             f"end-of-turn token (eos {token!r}), so the model would unlearn stopping: the chat "
                             f"template puts no eos after the assistant's reply; use a model whose chat template "
                             f"ends assistant turns with its eos token")
        taught += any(eos in run for run in runs)
    if not taught and any(labelled_runs(e.labels) for e in examples):
        raise StageError(f"stage {ctx.stage!r}: truncation at max_length={params.max_length} cuts the end-of-turn "
                         f"token (eos {token!r}) from every example, so the model would unlearn stopping; raise "
                         f"max_length")


def train_and_summarize(model, n_examples: int, step: StepFn, params: TrainingParams,
                        ctx: StageContext) -> StageResult:
    with neftune(model, params.neftune_alpha):  # the noise hook exists only while training
        summary = train(model, n_examples, step, params.loop_settings(), ctx, make_optimizer=params.make_optimizer())
    return summary_result(summary, n_examples)


def summary_result(summary: TrainSummary, n_examples: int) -> StageResult:
    """A training stage's metrics (loss, steps, tokens, the objective's own) and timings."""
    metrics = {"train_loss": summary.final_loss, "first_loss": summary.first_loss, "steps": summary.steps,
               "examples": n_examples, "tokens": summary.tokens, **summary.final_metrics}
    return StageResult(metrics=metrics, timings={"train_seconds": summary.seconds,
                                                 "tokens_per_s": summary.tokens / max(summary.seconds, 1e-9)})


def save_trained(model, tokenizer, params: TrainingParams, out: Path) -> None:
    """The full model (adapter merged where it can be) at the top of ``out``; a peft adapter also under
    ``adapter/``; Spectrum's chosen layers in ``spectrum.json``; see :mod:`tunegraph.training.strategies`."""
    save_trained_model(model, tokenizer, params.strategy, out)
