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
Rows may be chat rows ending in the reference answer, or verifiable rows (a prompt and an ``answer``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field

from tunegraph.answers import normalize_answer
from tunegraph.chat_data import prompt_and_reference, read_rows
from tunegraph.context import StageContext
from tunegraph.few_shot import few_shot_turns, with_examples
from tunegraph.generation import generate_answers, greedy_answers
from tunegraph.modelio import load_tokenizer
from tunegraph.training.strategies import load_with_adapter
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.rewards import resolve_reward
from tunegraph.training.chat_encoding import IGNORE_INDEX, encode_chat
from tunegraph.training.loop import collate
from tunegraph.errors import StageError
from tunegraph.verifiable_eval import is_correct, pass_at_k_scores, weighted_score

SCORES_FILE = "scores.json"
COMPARED = ("exact_match", "contains_match", "loss", "perplexity", "verifiable_accuracy")


class EvaluateParams(StageParams):
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


@torch.no_grad()
def reference_loss(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> float:
    """Token-weighted mean NLL of the reference answers."""
    examples = [encode_chat(tokenizer, row["messages"], max_length, row["id"]) for row in rows]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted,
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        total += nll.item()
        count += int((shifted != IGNORE_INDEX).sum())
    return total / max(count, 1)


@stage("evaluate", params=EvaluateParams, produces="eval",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",)),
               InputSlot("baseline", ("eval",), optional=True),
               InputSlot("examples", ("dataset",), optional=True)),
       summary_metrics=("exact_match", "contains_match", "perplexity"))
def evaluate(params: EvaluateParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Perplexity and exact-match accuracy of a model on a held-out chat dataset."""
    _check_params(params, inputs, ctx.stage)
    rows = [as_reference_row(row) for row in read_rows(inputs["dataset"])[: params.limit]]
    tokenizer = load_tokenizer(inputs["model"])
    model = load_with_adapter(inputs["model"])  # prompt-style strategies need their adapter at inference
    loss = reference_loss(model, tokenizer, rows, params.max_length, params.batch_size)
    prompts, references = zip(*(prompt_and_reference(row) for row in rows))
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
        predictions.append(prediction)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in predictions)
    scores = {"loss": loss, "perplexity": math.exp(loss), "rows": len(rows),
              "exact_match": sum(p["exact"] for p in predictions) / len(predictions),
              "contains_match": sum(p["contains"] for p in predictions) / len(predictions)}
    if rewards:
        scores["verifiable_accuracy"] = sum(p["correct"] for p in predictions) / len(predictions)
        scores["reward_mean"] = sum(p["reward"] for p in predictions) / len(predictions)
    if params.pass_k:
        sampled = generate_answers(model, tokenizer, list(prompts), params.max_new_tokens, params.batch_size,
                                   samples=params.samples, temperature=params.temperature,
                                   on_batch=lambda done, total: ctx.progress(done, total, "sampling"))
        scores.update(pass_at_k_scores(rewards, sampled, rows, params.pass_k))
    if "baseline" in inputs:
        baseline = json.loads((inputs["baseline"] / SCORES_FILE).read_text(encoding="utf-8"))
        scores.update({f"delta_{key}": scores[key] - baseline[key] for key in COMPARED
                       if key in scores and key in baseline})
    (out / SCORES_FILE).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return StageResult(metrics=scores)


def as_reference_row(row: dict) -> dict:
    """A verifiable row (prompt + ``answer``, no assistant reply) as a chat row ending in its answer."""
    messages = row["messages"]
    if messages and messages[-1]["role"] != "assistant" and row.get("answer") is not None:
        return {**row, "messages": [*messages, {"role": "assistant", "content": str(row["answer"])}]}
    return row


def _check_params(params: EvaluateParams, inputs: dict[str, Path], stage_name: str) -> None:
    if params.pass_k and not params.rewards:
        raise StageError(f"stage {stage_name!r}: pass_k needs rewards (e.g. rewards: {{numeric_match: 1}})")
    if params.pass_k and max(params.pass_k) > params.samples:
        raise StageError(f"stage {stage_name!r}: pass@{max(params.pass_k)} needs samples >= {max(params.pass_k)}, "
                         f"got samples={params.samples}")
    if params.few_shot and "examples" not in inputs:
        raise StageError(f"stage {stage_name!r}: few_shot={params.few_shot} needs an `examples` input "
                         f"(a dataset stage, usually the training data)")
