"""Evaluate a model on held-out chat data: reference loss / perplexity and answer accuracy.

- ``loss``: mean negative log-likelihood of the reference assistant tokens given the prompt;
  ``perplexity = exp(loss)``.
- ``exact_match``: greedy answer equals the reference after normalization (first line, surrounding
  whitespace, quotes and trailing punctuation; case is kept: "LAZY ROAD" is not "lazy road");
  ``contains_match``: the normalized reference appears in the answer (credits right-but-verbose
  answers).
With a ``baseline`` input (another evaluate stage) the deltas against it are reported too.
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
from tunegraph.generation import greedy_answers
from tunegraph.modelio import load_tokenizer
from tunegraph.training.strategies import load_with_adapter
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.chat_encoding import IGNORE_INDEX, encode_chat
from tunegraph.training.loop import collate

SCORES_FILE = "scores.json"
COMPARED = ("exact_match", "contains_match", "loss", "perplexity")


class EvaluateParams(StageParams):
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1, description="evaluate the first N rows only")


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
               InputSlot("baseline", ("eval",), optional=True)),
       summary_metrics=("exact_match", "contains_match", "perplexity"))
def evaluate(params: EvaluateParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Perplexity and exact-match accuracy of a model on a held-out chat dataset."""
    rows = read_rows(inputs["dataset"])[: params.limit]
    tokenizer = load_tokenizer(inputs["model"])
    model = load_with_adapter(inputs["model"])  # prompt-style strategies need their adapter at inference
    loss = reference_loss(model, tokenizer, rows, params.max_length, params.batch_size)
    prompts, references = zip(*(prompt_and_reference(row) for row in rows))
    answers = greedy_answers(model, tokenizer, list(prompts), params.max_new_tokens, params.batch_size,
                             on_batch=lambda done, total: ctx.progress(done, total, "generating"))
    predictions = []
    for row, reference, answer in zip(rows, references, answers):
        predictions.append({"id": row["id"], "reference": reference, "answer": answer,
                            "exact": normalize_answer(answer) == normalize_answer(reference),
                            "contains": normalize_answer(reference) in " ".join(answer.split())})
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in predictions)
    scores = {"loss": loss, "perplexity": math.exp(loss), "rows": len(rows),
              "exact_match": sum(p["exact"] for p in predictions) / len(predictions),
              "contains_match": sum(p["contains"] for p in predictions) / len(predictions)}
    if "baseline" in inputs:
        baseline = json.loads((inputs["baseline"] / SCORES_FILE).read_text(encoding="utf-8"))
        scores.update({f"delta_{key}": scores[key] - baseline[key] for key in COMPARED})
    (out / SCORES_FILE).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return StageResult(metrics=scores)
