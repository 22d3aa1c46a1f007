"""Stage kind ``teacher_generate``: replace each row's reference answer by a teacher model's own answer.

Sequence-level knowledge distillation (Kim & Rush 2016, https://arxiv.org/abs/1606.07947): the student
is trained with plain SFT on the teacher's outputs instead of matching its distributions, so teacher and
student may have different tokenizers and architectures (the data is text). With reasoning traces kept
(``keep_reasoning: true``, the default) this is how DeepSeek-R1 distilled its reasoning into smaller
models (https://arxiv.org/abs/2501.12948): the student learns the whole chain of thought.

For every row the prompt is the conversation up to its final assistant message; the teacher answers it
through its own chat template, greedily (``temperature`` unset) or by seeded sampling (``temperature``,
``top_p``, ``samples`` answers per prompt, ids ``<id>-<k>``). The output is a chat dataset, the
prompt plus the teacher's answer, which ``sft`` consumes. A verifiable row keeps its ``answer`` (the
reference for rewards and evaluation); preference and feedback fields belonged to the old reply and
are dropped.

- ``keep_reasoning: false`` removes reasoning spans between ``reasoning_tags`` (default ``<think>`` /
  ``</think>``): a closing tag with no opening one (templates that open the span in the generation
  prompt) drops everything before it; an opening tag left unclosed (the trace ran out of tokens) drops
  the rest. The raw generations are kept in ``raw_generations.jsonl``.
- ``drop_truncated: true`` (default) drops answers that used all ``max_new_tokens`` (re-tokenized with
  the teacher's tokenizer: a finished answer is shorter, since its end-of-turn token is not text), so
  the student does not learn to stop mid-sentence. Answers left empty are always dropped.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunegraph.chat_data import Row, prompt_and_reference, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.generation import generate_answers
from tunegraph.modelio import load_tokenizer
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.strategies import load_with_adapter

RAW_FILE = "raw_generations.jsonl"
KEPT_FIELDS = ("answer",)  # row fields still true of the new reply


class TeacherGenerateParams(StageParams):
    max_new_tokens: int = Field(256, ge=1, description="most tokens per answer")
    temperature: float | None = Field(None, gt=0, description="unset: greedy decoding; set: seeded sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (with temperature)")
    samples: int = Field(1, ge=1, description="answers per prompt (more than 1 needs temperature)")
    keep_reasoning: bool = Field(True, description="false: strip reasoning spans between reasoning_tags")
    reasoning_tags: tuple[str, str] = Field(("<think>", "</think>"), description="opening and closing tag")
    drop_truncated: bool = Field(True, description="drop answers cut off by max_new_tokens")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the teacher runs in")
    limit: int | None = Field(None, ge=1, description="answer the first N rows only")

    @model_validator(mode="after")
    def _sampling(self) -> "TeacherGenerateParams":
        if self.samples > 1 and self.temperature is None:
            raise ValueError(f"samples={self.samples} needs a temperature (greedy decoding gives one answer)")
        if not all(tag.strip() for tag in self.reasoning_tags):
            raise ValueError("reasoning_tags must be two non-empty strings")
        return self


def strip_reasoning(text: str, tags: tuple[str, str]) -> str:
    """``text`` without its reasoning spans (module docstring), surrounding whitespace removed."""
    opening, closing = tags
    text = re.sub(re.escape(opening) + ".*?" + re.escape(closing), "", text, flags=re.DOTALL)
    if closing in text:  # the span was opened by the generation prompt
        text = text.split(closing)[-1]
    if opening in text:  # opened and never closed: the trace was cut off
        text = text.split(opening)[0]
    return text.strip()


@stage("teacher_generate", params=TeacherGenerateParams, produces="dataset",
       inputs=(InputSlot("teacher", ("model",)), InputSlot("dataset", ("dataset",))),
       summary_metrics=("rows", "dropped_truncated", "dropped_empty"))
def teacher_generate(params: TeacherGenerateParams, inputs: dict[str, Path], out: Path,
                     ctx: StageContext) -> StageResult:
    """Answer every prompt of the dataset with the teacher; write prompt + answer rows."""
    import torch

    started = time.monotonic()
    rows = read_rows(inputs["dataset"])[: params.limit]
    tokenizer = load_tokenizer(inputs["teacher"])
    teacher = load_with_adapter(inputs["teacher"])
    if params.dtype != "float32":
        teacher = teacher.to(getattr(torch, params.dtype))
    prompts = [prompt_and_reference(row)[0] for row in rows]
    answers = generate_answers(teacher, tokenizer, prompts, params.max_new_tokens, params.batch_size,
                               samples=params.samples, temperature=params.temperature, top_p=params.top_p,
                               on_batch=lambda done, total: ctx.progress(done, total, "generating"))
    kept, raw, counts = [], [], {"dropped_truncated": 0, "dropped_empty": 0, "reasoning_stripped": 0}
    for row, prompt, group in zip(rows, prompts, answers):
        for k, generated in enumerate(group):
            row_id = row["id"] if params.samples == 1 else f"{row['id']}-{k}"
            reply = generated.strip() if params.keep_reasoning else strip_reasoning(generated, params.reasoning_tags)
            counts["reasoning_stripped"] += int(reply != generated.strip())
            raw.append({"id": row_id, "generation": generated})
            if params.drop_truncated and _used_every_token(tokenizer, generated, params.max_new_tokens):
                counts["dropped_truncated"] += 1
            elif not reply:
                counts["dropped_empty"] += 1
            else:
                kept.append(_answered_row(row, row_id, prompt, reply))
    if not kept:
        raise StageError(f"stage {ctx.stage!r}: every one of the {len(raw)} teacher answers was dropped "
                         f"({counts['dropped_truncated']} cut off at max_new_tokens={params.max_new_tokens}, "
                         f"{counts['dropped_empty']} empty); raise max_new_tokens or set drop_truncated: false")
    write_rows(kept, out / "data.jsonl")
    if not params.keep_reasoning:
        (out / RAW_FILE).write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in raw),
                                    encoding="utf-8")
    metrics = {"rows": len(kept), "prompts": len(rows), "answer_chars_mean": _mean_chars(kept), **counts}
    return StageResult(metrics=metrics, timings={"generate_s": time.monotonic() - started})


def _used_every_token(tokenizer, generated: str, max_new_tokens: int) -> bool:
    return len(tokenizer(generated, add_special_tokens=False)["input_ids"]) >= max_new_tokens


def _answered_row(row: Row, row_id: str, prompt: list[dict], reply: str) -> Row:
    return {"id": row_id, "messages": [*prompt, {"role": "assistant", "content": reply}],
            **{key: row[key] for key in KEPT_FIELDS if key in row}}


def _mean_chars(rows: list[Row]) -> float:
    return sum(len(row["messages"][-1]["content"]) for row in rows) / len(rows)
