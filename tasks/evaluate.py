"""Evaluate a model on held-out chat data: reference loss / perplexity and answer accuracy.

- ``loss``: mean negative log-likelihood of the reference assistant tokens given the prompt;
  ``perplexity = exp(loss)``.
- ``exact_match``: greedy answer equals the reference after normalization (first line, surrounding
  whitespace, quotes and trailing punctuation; case is kept: "LAZY ROAD" is not "lazy road");
  ``contains_match``: the normalized reference appears in the answer (credits right-but-verbose
  answers).
- ``verifiable_accuracy`` (with ``rewards``): pass@1 of the greedy answers, a completion being correct
  when the weighted mean of the reward functions (e.g. ``numeric_match``) reaches 1; ``reward_mean`` is
  that weighted mean; ``pass@k`` for each ``pass_k`` from ``samples`` sampled answers per problem
  (unbiased estimator, :mod:`tunegraph.verifiable_eval`).
- ``few_shot: k`` with an ``examples`` dataset: k solved examples precede every prompt, the baseline a
  fine-tune must beat (a base model evaluated zero-shot and k-shot is the "baseline ladder").
With a ``baseline`` input (another evaluate stage) the deltas against it are reported too.
- ``win_rate`` / ``tie_rate`` / ``loss_rate`` (with ``judge`` and a ``baseline``): an LLM judge compares
  each greedy answer with the baseline's stored answer to the same item, in both orders to cancel
  position bias (MT-Bench, :mod:`tunegraph.win_rate`); per-item verdicts in ``pairwise.jsonl``.
- With a ``contamination`` input (a decontaminate stage's artifact) every metric is reported again on
  the clean items only (``clean_exact_match``...; no training row flagged against them), with
  ``contaminated_items`` and the flagged items in ``contaminated_items.jsonl``
  (:mod:`tunegraph.contamination_split`).
Rows may be chat rows ending in the reference answer, or verifiable rows (a prompt and an ``answer``).
Per-item answers are kept in ``predictions.jsonl`` (what a later stage's judge compares against).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field, field_validator

from tunegraph.answers import normalize_answer
from tunegraph.chat_data import prompt_and_reference, read_rows
from tunegraph.contamination_split import FLAGGED_FILE, NotDecontaminated, flagged_items, write_flagged
from tunegraph.context import StageContext
from tunegraph.few_shot import few_shot_turns, with_examples
from tunegraph.generation import generate_answers, greedy_answers
from tunegraph.modelio import load_tokenizer
from tunegraph.training.strategies import load_with_adapter
from tunegraph.llm_backend import LLMSettings, LLMStageParams, Sampling, open_backend
from tunegraph.registry import InputSlot, InputsMismatch, StageResult, UpstreamNames, stage, upstream_names
from tunegraph.row_cache import RowCache
from tunegraph.rewards import resolve_reward
from tunegraph.training.chat_encoding import IGNORE_INDEX, encode_chat
from tunegraph.training.loop import collate
from tunegraph.errors import StageError
from tunegraph.verifiable_eval import is_correct, pass_at_k_scores, weighted_score
from tunegraph.win_rate import (PAIRWISE_TEMPLATE, REPLIES_FILE, VERDICTS_FILE, Pair, PairwiseJudge,
                                baseline_answers, check_template, judge_pairs, question_text, win_rate_metrics,
                                write_verdicts)

SCORES_FILE = "scores.json"
PREDICTIONS_FILE = "predictions.jsonl"
COMPARED = ("exact_match", "contains_match", "loss", "perplexity", "verifiable_accuracy", "win_rate")
CLEAN = "clean_"  # prefix of the metrics on the items no training row was flagged against


class EvaluateParams(LLMStageParams):
    LLM_FIELDS = ("judge",)

    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1, description="evaluate the first N rows only")
    rewards: dict[str, float] = Field(default_factory=dict, description="reward function -> weight: "
                                      "verifiable_accuracy (pass@1) of greedy answers, e.g. {numeric_match: 1}")
    pass_k: list[int] = Field(default_factory=list, description="report pass@k for these k (needs rewards, samples)")
    samples: int = Field(0, ge=0, description="sampled answers per problem for pass@k")
    temperature: float = Field(0.8, gt=0, description="sampling temperature for pass@k")
    few_shot: int = Field(0, ge=0, description="solved examples from the `examples` input before each prompt")
    judge: LLMSettings | None = Field(None, description="LLM judge of win_rate against the baseline input's answers "
                                                        "(default with a 'judge' input: that model)")
    judge_template: str = Field(PAIRWISE_TEMPLATE, description="Jinja2 pairwise judge prompt: instruction, "
                                                               "answer_a, answer_b; the verdict is [[A]], [[B]] or [[C]]")
    judge_prefill: str = Field("[[", description="text the judge's reply is made to start with; parsed with the reply")
    judge_sampling: Sampling = Field(default_factory=lambda: Sampling(max_new_tokens=16),
                                     description="judge sampling (default greedy)")

    @field_validator("judge_template")
    @classmethod
    def _template_shows_both_answers(cls, value: str) -> str:
        check_template(value)
        return value

    def source_identity(self) -> str:
        return super().source_identity() if self.judge is not None else ""


@torch.no_grad()
def reference_nll(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> list[tuple[float, int]]:
    """Per row: the summed NLL of its reference answer tokens, and how many tokens that is."""
    examples = [encode_chat(tokenizer, row["messages"], max_length, row["id"]) for row in rows]
    per_row: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        per_row += zip(nll.sum(-1).tolist(), (shifted != IGNORE_INDEX).sum(-1).tolist())
    return per_row


def reference_loss(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> float:
    """Token-weighted mean NLL of the reference answers."""
    return _mean_loss(reference_nll(model, tokenizer, rows, max_length, batch_size))


def _mean_loss(per_row: list[tuple[float, int]]) -> float:
    return sum(total for total, _ in per_row) / max(sum(count for _, count in per_row), 1)


def check_inputs(params: EvaluateParams, upstream: UpstreamNames) -> None:
    """Recipe validation: a judge needs a baseline eval to compare against."""
    if (params.judge is not None or "judge" in upstream) and "baseline" not in upstream:
        where = ("params", "judge") if params.judge is not None else ("inputs", "judge")
        raise InputsMismatch("a judge (win_rate) needs a `baseline` input: the evaluate stage whose answers "
                             "it compares against (e.g. the base model's)", where)


@stage("evaluate", params=EvaluateParams, produces="eval",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",)),
               InputSlot("baseline", ("eval",), optional=True),
               InputSlot("examples", ("dataset",), optional=True),
               InputSlot("judge", ("model",), optional=True),
               InputSlot("contamination", ("dataset",), optional=True)),
       summary_metrics=("exact_match", "contains_match", "perplexity"), check_inputs=check_inputs)
def evaluate(params: EvaluateParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Perplexity and exact-match accuracy of a model on a held-out chat dataset."""
    _check_params(params, inputs, ctx.stage)
    rows = [as_reference_row(row) for row in read_rows(inputs["dataset"])[: params.limit]]
    flagged = _flagged(inputs, ctx.stage)
    baseline = _baseline_answers(inputs, ctx.stage) if _judged(params, inputs) else None
    tokenizer = load_tokenizer(inputs["model"])
    model = load_with_adapter(inputs["model"])  # prompt-style strategies need their adapter at inference
    nll = reference_nll(model, tokenizer, rows, params.max_length, params.batch_size)
    questions, references = zip(*(prompt_and_reference(row) for row in rows))
    prompts = questions
    if params.few_shot:
        examples = few_shot_turns(read_rows(inputs["examples"]), params.few_shot, ctx.seed)
        prompts = tuple(with_examples(prompt, examples) for prompt in prompts)
    answers = greedy_answers(model, tokenizer, list(prompts), params.max_new_tokens, params.batch_size,
                             on_batch=lambda done, total: ctx.progress(done, total, "generating"))
    rewards = [(resolve_reward(spec), weight) for spec, weight in params.rewards.items()]
    predictions = []
    for row, prompt, reference, answer in zip(rows, prompts, references, answers):
        prediction = {"id": row["id"], "reference": reference, "answer": answer, "prompt_turns": len(prompt),
                      "exact": normalize_answer(answer) == normalize_answer(reference),
                      "contains": normalize_answer(reference) in " ".join(answer.split())}
        if rewards:
            prediction["reward"] = weighted_score(rewards, answer, row)
            prediction["correct"] = is_correct(rewards, answer, row)
        if flagged is not None:
            prediction["contaminated"] = row["id"] in flagged
        predictions.append(prediction)
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in predictions)
    sampled = None
    if params.pass_k:
        sampled = generate_answers(model, tokenizer, list(prompts), params.max_new_tokens, params.batch_size,
                                   samples=params.samples, temperature=params.temperature,
                                   on_batch=lambda done, total: ctx.progress(done, total, "sampling"))
    pairs = None
    if baseline is not None:
        del model  # the judge may be another local model
        pairs = _judge_against_baseline(params, inputs, ctx, rows, questions, answers, baseline, out, flagged)
    everything = list(range(len(rows)))
    scores = {**item_scores(everything, predictions, nll, rows, rewards, sampled, params.pass_k),
              "rows": len(rows)}
    if pairs is not None:
        scores.update(win_rate_metrics(list(pairs.values()), unmatched=len(rows) - len(pairs)))
    if flagged is not None:
        clean = [i for i, row in enumerate(rows) if row["id"] not in flagged]
        scores.update({"contaminated_items": len(rows) - len(clean), f"{CLEAN}rows": len(clean)})
        if clean:
            scores.update({CLEAN + k: v for k, v in
                           item_scores(clean, predictions, nll, rows, rewards, sampled, params.pass_k).items()})
            if pairs is not None:
                clean_pairs = [pairs[rows[i]["id"]] for i in clean if rows[i]["id"] in pairs]
                scores.update({CLEAN + k: v for k, v in win_rate_metrics(clean_pairs).items()
                               if k.endswith("_rate") or k == "judge_compared"})
        write_flagged(flagged, predictions, out / FLAGGED_FILE)
    if "baseline" in inputs:
        previous = json.loads((inputs["baseline"] / SCORES_FILE).read_text(encoding="utf-8"))
        keys = COMPARED + tuple(CLEAN + key for key in COMPARED)
        scores.update({f"delta_{key}": scores[key] - previous[key] for key in keys
                       if key in scores and key in previous})
    (out / SCORES_FILE).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return StageResult(metrics=scores)


def item_scores(items: list[int], predictions: list[dict], nll: list[tuple[float, int]], rows: list[dict],
                rewards: list, sampled: list[list[str]] | None, pass_k: list[int]) -> dict[str, float]:
    """Loss, perplexity and accuracies over the eval items at positions ``items``."""
    chosen = [predictions[i] for i in items]
    loss = _mean_loss([nll[i] for i in items])
    scores = {"loss": loss, "perplexity": math.exp(loss),
              "exact_match": sum(p["exact"] for p in chosen) / len(chosen),
              "contains_match": sum(p["contains"] for p in chosen) / len(chosen)}
    if rewards:
        scores["verifiable_accuracy"] = sum(p["correct"] for p in chosen) / len(chosen)
        scores["reward_mean"] = sum(p["reward"] for p in chosen) / len(chosen)
    if sampled is not None:
        scores.update(pass_at_k_scores(rewards, [sampled[i] for i in items], [rows[i] for i in items], pass_k))
    return scores


def _judged(params: EvaluateParams, inputs: dict[str, Path]) -> bool:
    return params.judge is not None or "judge" in inputs


def _judge_against_baseline(params: EvaluateParams, inputs: dict[str, Path], ctx: StageContext, rows: list[dict],
                            questions, answers: list[str], baseline: dict[str, str], out: Path,
                            flagged: dict | None) -> dict[str, Pair]:
    """Pairs by item id (items the baseline answered), judged in both orders; verdicts written to ``out``."""
    pairs = {row["id"]: Pair(row["id"], question_text(question), answer, baseline[row["id"]])
             for row, question, answer in zip(rows, questions, answers) if row["id"] in baseline}
    if not pairs:
        raise StageError(f"stage {ctx.stage!r}: the baseline eval {inputs['baseline'].name!r} answered none of these "
                         f"{len(rows)} items (no common ids); give both stages the same eval dataset")
    backend = open_backend(params.judge, inputs.get("judge"), stage=ctx.stage, role="judge", workspace=ctx.workspace)
    ctx.info(f"judge: {backend.description}; {len(pairs)} answers against the baseline's, both orders")
    judge_pairs(backend, PairwiseJudge(params.judge_template, params.judge_prefill), list(pairs.values()),
                RowCache.for_stage(ctx, REPLIES_FILE), params.judge_sampling, ctx.seed,
                on_progress=lambda done, total: ctx.progress(done, total, "judging"))
    write_verdicts(list(pairs.values()), out / VERDICTS_FILE, None if flagged is None else set(flagged))
    return pairs


def _baseline_answers(inputs: dict[str, Path], stage_name: str) -> dict[str, str]:
    answers = baseline_answers(inputs["baseline"], PREDICTIONS_FILE)
    if answers is None:
        raise StageError(f"stage {stage_name!r}: the baseline eval {inputs['baseline'].name!r} has no "
                         f"{PREDICTIONS_FILE} (per-item answers) to judge against; re-run it with this version")
    return answers


def _flagged(inputs: dict[str, Path], stage_name: str) -> dict[str, list[dict]] | None:
    if "contamination" not in inputs:
        return None
    try:
        return flagged_items(inputs["contamination"], inputs["dataset"].name)
    except NotDecontaminated as err:
        raise StageError(f"stage {stage_name!r}: {err}") from None


def as_reference_row(row: dict) -> dict:
    """A verifiable row (prompt + ``answer``, no assistant reply) as a chat row ending in its answer."""
    messages = row["messages"]
    if messages and messages[-1]["role"] != "assistant" and row.get("answer") is not None:
        return {**row, "messages": [*messages, {"role": "assistant", "content": str(row["answer"])}]}
    return row


def _check_params(params: EvaluateParams, inputs: dict[str, Path], stage_name: str) -> None:
    try:
        check_inputs(params, upstream_names(inputs))
    except InputsMismatch as err:
        raise StageError(f"stage {stage_name!r}: {err}") from None
    if params.pass_k and not params.rewards:
        raise StageError(f"stage {stage_name!r}: pass_k needs rewards (e.g. rewards: {{numeric_match: 1}})")
    if params.pass_k and max(params.pass_k) > params.samples:
        raise StageError(f"stage {stage_name!r}: pass@{max(params.pass_k)} needs samples >= {max(params.pass_k)}, "
                         f"got samples={params.samples}")
    if params.few_shot and "examples" not in inputs:
        raise StageError(f"stage {stage_name!r}: few_shot={params.few_shot} needs an `examples` input "
                         f"(a dataset stage, usually the training data)")
