"""Stage kind ``self_instruct``: new instructions grown from seed instructions, then answered by a teacher LLM.

Self-Instruct (Wang et al. 2023, https://arxiv.org/abs/2212.10560). Each round asks the teacher
``calls_per_round`` times for ``instructions_per_call`` new instructions, showing it ``context_size``
instructions drawn (seeded) from the pool of seeds and instructions accepted so far; the prompt and the
reply parser are distilabel's ``SelfInstruct`` task. A new instruction is kept when it is within the
word bounds and not too close to any pool instruction (``difflib`` ratio < ``max_similarity``; the
paper uses ROUGE-L < 0.7), and joins the pool for the next round. The kept instructions are then
answered by the teacher (``responses`` replies each), giving chat rows.

A reply that is missing, or yields no usable instruction or answer, drops that part and is counted;
it never stops the stage. Replies are kept in the stage's row cache, so a re-run after a crash resumes.
"""

from __future__ import annotations

import difflib
import random
import re
from pathlib import Path

from pydantic import Field, field_validator

from tunegraph.chat_data import Row, dataset_file, derived_id, prompt_and_reference, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.llm_backend import ChatBackend, LLMSettings, LLMStageParams, Sampling, distilabel_task, open_backend
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.row_cache import ChatCounts, RowCache, cached_chat, chat_request

# Bullets and numbering that teachers put before list items despite the prompt asking them not to.
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,3}[.):]|#+)\s*")


class SelfInstructParams(LLMStageParams):
    LLM_FIELDS = ("teacher",)

    teacher: LLMSettings | None = Field(None, description="the LLM that writes and answers instructions "
                                                          "(default: the model connected to input 'teacher')")
    rounds: int = Field(1, ge=1, description="rounds of generation; each round's instructions join the pool")
    calls_per_round: int = Field(4, ge=1, description="teacher calls per round")
    context_size: int = Field(3, ge=1, description="pool instructions shown to the teacher per call")
    instructions_per_call: int = Field(5, ge=1, description="instructions asked for per call")
    max_instructions: int | None = Field(None, ge=1, description="stop once this many new instructions are kept")
    application_description: str = Field("AI assistant", description="what the instructions are for (prompt)")
    criteria: str | None = Field(None, description="criteria for the queries (default: distilabel's)")
    template: str | None = Field(None, description="Jinja2 prompt replacing distilabel's self-instruct.jinja2 "
                                                   "(variables: input, num_instructions, "
                                                   "criteria_for_query_generation, application_description)")
    min_words: int = Field(3, ge=1, description="shortest instruction kept, in words")
    max_words: int = Field(80, ge=1, description="longest instruction kept, in words")
    max_similarity: float = Field(0.7, gt=0, le=1, description="drop an instruction this close to one in the pool")
    responses: int = Field(1, ge=1, description="answers per new instruction (>1 with sampling: candidates for pairs)")
    include_seeds: bool = Field(False, description="also write the seed rows, after the new ones")
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_new_tokens=160, temperature=0.7, top_p=0.95),
                               description="sampling of the instruction-writing calls")
    answer_sampling: Sampling = Field(default_factory=lambda: Sampling(max_new_tokens=256),
                                      description="sampling of the answers (default greedy)")

    @field_validator("template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is not None:
            check_jinja(value)
        return value


def check_jinja(text: str) -> None:
    """Raise ValueError (a recipe error naming the field) when ``text`` is not a valid Jinja2 template."""
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"not a valid Jinja2 template: {exc.message} (line {exc.lineno})") from None


def instruction_of(row: Row) -> str:
    """The instruction a chat row asks: its last user message."""
    prompt, _ = prompt_and_reference(row)
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def clean_instruction(line: str) -> str:
    """A generated line without list markers, surrounding quotes, or a quote left open at either end."""
    text = line.strip()
    for _ in range(2):  # a quote may wrap a numbered item, or a number precede a quoted one
        text = _LIST_MARKER.sub("", text).strip()
        for quote in "\"'`":
            if text.count(quote) % 2 and text.startswith(quote):
                text = text[1:].strip()
            elif text.count(quote) % 2 and text.endswith(quote):
                text = text[:-1].strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
            text = text[1:-1].strip()
    return text


class InstructionPool:
    """Instructions known so far; accepts a candidate only if it is new enough and well-sized."""

    def __init__(self, seeds: list[str], min_words: int, max_words: int, max_similarity: float):
        self.items = list(seeds)
        self._normalized = [_normalize(s) for s in seeds]
        self.min_words, self.max_words, self.max_similarity = min_words, max_words, max_similarity

    def accept(self, candidate: str) -> bool:
        words = len(candidate.split())
        if not self.min_words <= words <= self.max_words or candidate.endswith(":"):
            return False
        normalized = _normalize(candidate)
        for known in self._normalized:
            matcher = difflib.SequenceMatcher(None, normalized, known, autojunk=False)
            if matcher.quick_ratio() >= self.max_similarity and matcher.ratio() >= self.max_similarity:
                return False
        self.items.append(candidate)
        self._normalized.append(normalized)
        return True


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def answer_instructions(backend: ChatBackend, cache: RowCache, instructions: list[str], responses: int,
                        sampling: Sampling, ctx: StageContext, counts: ChatCounts) -> tuple[list[Row], dict[str, float]]:
    """Chat rows answering each instruction ``responses`` times; empty or missing answers are dropped and counted."""
    requests = [chat_request(f"answer{k}", [{"role": "user", "content": instruction}])
                for instruction in instructions for k in range(responses)]
    replies = cached_chat(backend, cache, requests, sampling, ctx.seed, counts,
                          on_progress=lambda done, total: ctx.progress(done, total, "answering"))
    rows, seen = [], set()
    missing = empty = duplicates = 0
    for request, reply in zip(requests, replies):
        if reply is None:
            missing += 1
            continue
        if not reply.strip():
            empty += 1
            continue
        messages = request.conversation + [{"role": "assistant", "content": reply}]
        row_id = derived_id(messages)
        if row_id in seen:  # the same answer twice (greedy answers, or a sampling coincidence)
            duplicates += 1
            continue
        seen.add(row_id)
        rows.append({"id": row_id, "messages": messages})
    return rows, {"answers_missing": missing, "answers_empty": empty, "answers_duplicate": duplicates}


def grow_instructions(task, backend: ChatBackend, cache: RowCache, seeds: list[str], params: SelfInstructParams,
                      ctx: StageContext, counts: ChatCounts) -> tuple[list[str], dict[str, float]]:
    """The Self-Instruct rounds: new instructions in the order they were accepted, and call counts."""
    pool = InstructionPool(seeds, params.min_words, params.max_words, params.max_similarity)
    rng = random.Random(ctx.seed)
    new: list[str] = []
    calls = failed_calls = unusable_replies = 0

    def full() -> bool:
        return params.max_instructions is not None and len(new) >= params.max_instructions

    for round_index in range(params.rounds):
        if full():
            break
        requests = []
        for call in range(params.calls_per_round):
            context = rng.sample(pool.items, min(params.context_size, len(pool.items)))
            requests.append(chat_request(f"instructions:{round_index}:{call}",
                                         task.format_input({"input": "\n".join(context)})))
        replies = cached_chat(backend, cache, requests, params.sampling, ctx.seed, counts,
                              on_progress=lambda d, t: ctx.progress(d, t, f"round {round_index + 1}"))
        calls += len(requests)
        for reply in replies:
            if reply is None:
                failed_calls += 1
                continue
            if full():
                break
            kept = [c for c in map(clean_instruction, task.format_output(reply)["instructions"]) if pool.accept(c)]
            new += kept[: params.max_instructions - len(new) if params.max_instructions else None]
            unusable_replies += not kept
    return new, {"instruction_calls": calls, "failed_calls": failed_calls, "unusable_replies": unusable_replies}


def require_rows(rows: list[Row], stage_name: str, counts: dict[str, float], hint: str) -> None:
    """An empty dataset is useless downstream: fail with the counts that explain why it is empty."""
    if not rows:
        detail = ", ".join(f"{k}={v:.4g}" for k, v in counts.items() if v)
        raise StageError(f"stage {stage_name!r} produced no rows ({detail}); {hint}")


@stage("self_instruct", params=SelfInstructParams, produces="dataset",
       inputs=(InputSlot("dataset", ("dataset",)), InputSlot("teacher", ("model",), optional=True)),
       summary_metrics=("new_instructions", "rows"))
def self_instruct(params: SelfInstructParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Self-Instruct: grow instructions from seed rows with a teacher LLM, then answer them."""
    seed_rows = read_rows(inputs["dataset"])
    seeds = list(dict.fromkeys(instruction_of(row) for row in seed_rows))
    attributes = {"num_instructions": params.instructions_per_call,
                  "application_description": params.application_description}
    if params.criteria is not None:
        attributes["criteria_for_query_generation"] = params.criteria
    task = distilabel_task("SelfInstruct", **attributes)
    if params.template is not None:
        from jinja2 import Template

        task._template = Template(params.template)  # the task renders this in format_input
    backend = open_backend(params.teacher, inputs.get("teacher"), stage=ctx.stage, role="teacher",
                           workspace=ctx.workspace)
    ctx.info(f"teacher: {backend.description}; {len(seeds)} seed instructions")
    cache, counts = RowCache.for_stage(ctx), ChatCounts()
    new, grow_counts = grow_instructions(task, backend, cache, seeds, params, ctx, counts)
    rows, answer_counts = answer_instructions(backend, cache, new, params.responses, params.answer_sampling,
                                              ctx, counts)
    if params.include_seeds:  # after the new rows, so that a later `limit` picks new rows first
        new_ids = {row["id"] for row in rows}
        rows += [row for row in seed_rows if row["id"] not in new_ids]
    metrics = {"seeds": len(seeds), **grow_counts, "new_instructions": len(new), **answer_counts, "rows": len(rows)}
    require_rows(rows, ctx.stage, metrics, "a stronger teacher, more calls or looser bounds may help")
    write_rows(rows, dataset_file(out))
    return StageResult(metrics={k: float(v) for k, v in metrics.items()},
                       timings={"requests_sent": counts.sent, "requests_resumed": counts.reused})
