"""Stage kind ``judge``: an LLM scores each reply on a rubric; keep scored rows, or build preference data.

Each distinct (instruction, reply) is shown to the judge once; the score is parsed from its reply.

- ``prompt: rubric`` (default): the ``template`` below (Jinja2: ``instruction``, ``response``, ``rubric``)
  asks for ``Score: N`` with N in 1..10 (LLM-as-a-judge, Zheng et al. 2023, https://arxiv.org/abs/2306.05685).
  The judge's reply is prefilled with ``Score:`` so that small local judges answer with a number
  instead of answering the instruction themselves.
- ``prompt: ultrafeedback``: distilabel's ``UltraFeedback`` task (its template for ``aspect`` and its
  parser), one response per call, ratings 1..5 (Cui et al. 2023, https://arxiv.org/abs/2310.01377).

Modes (what the output holds):

- ``score``: the input rows with a ``score``; ``min_score`` drops rows below it.
- ``pairs``: replies are grouped by prompt; per prompt the best-scored reply is ``chosen`` and the
  worst ``rejected`` when ``score(chosen) - score(rejected) >= min_gap`` (rows for DPO-family stages).
  Candidates are every row's final reply and any ``rejected`` reply already on the row.
- ``kto``: each row labelled desirable when ``score >= kto_threshold`` (unpaired rows for KTO).

A judge reply without a score in range drops that row and is counted (``malformed``); it never stops
the stage. With ``reuse_scores`` a row that already carries a ``score`` (an upstream judge stage) is not
sent again. Raw judge replies are kept in ``judgements.jsonl``. The judge's prompt, rubric and model
are params, so they are part of the fingerprint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tunegraph.chat_data import Row, dataset_file, derived_id, prompt_and_reference, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.hashing import canonical_json
from tunegraph.llm_backend import LLMSettings, LLMStageParams, Sampling, distilabel_task, open_backend
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.row_cache import ChatCounts, RowCache, cached_chat, chat_request
from tunegraph.tasks.self_instruct import check_jinja, instruction_of, require_rows

DEFAULT_RUBRIC = """\
10: correct, complete, and answers exactly what was asked.
7-9: correct, with small omissions or unneeded text.
4-6: partly correct, or partly off-topic.
1-3: wrong, empty, off-topic, or an unjustified refusal."""

DEFAULT_TEMPLATE = """\
You are a strict grader. Rate the response to the instruction on a scale of 1 to 10.

Rubric:
{{ rubric }}

Instruction:
{{ instruction }}

Response:
{{ response }}

Give your rating as a whole number from 1 (worst) to 10 (best) after "Score:", then one short sentence \
explaining why."""

SCALES = {"rubric": (1.0, 10.0), "ultrafeedback": (1.0, 5.0)}
DEFAULT_KTO_THRESHOLD = {"rubric": 7.0, "ultrafeedback": 4.0}
# "Score: 8", "score = 8/10", "**Score:** 7.5", "Rating: 9"; else a reply that is only a number ("8", "8/10").
_SCORE = re.compile(r"(?:score|rating)\**\s*(?:is|of|=|:)?\s*\**\s*(\d{1,2}(?:\.\d+)?)(?!\d)", re.IGNORECASE)
_BARE = re.compile(r"^\s*(\d{1,2}(?:\.\d+)?)\s*(?:/\s*\d+)?\s*\.?\s*$")
JUDGEMENTS_FILE = "judgements.jsonl"


class JudgeParams(LLMStageParams):
    LLM_FIELDS = ("judge",)

    judge: LLMSettings | None = Field(None, description="the judging LLM (default: the model connected to input "
                                                        "'judge')")
    mode: Literal["score", "pairs", "kto"] = Field("score", description="what to write (see the module doc)")
    prompt: Literal["rubric", "ultrafeedback"] = Field("rubric", description="rubric (1-10) or distilabel's "
                                                                             "UltraFeedback (1-5)")
    rubric: str = Field(DEFAULT_RUBRIC, description="the rubric text shown to the judge (prompt: rubric)")
    template: str = Field(DEFAULT_TEMPLATE, description="Jinja2 judge prompt: instruction, response, rubric")
    prefill: str = Field("Score:", description="prompt rubric: text the judge's reply is made to start with "
                                                "(local models and tunegraph serve continue it); parsed with the reply")
    aspect: Literal["overall-rating", "helpfulness", "honesty", "instruction-following", "truthfulness"] = Field(
        "overall-rating", description="UltraFeedback aspect (prompt: ultrafeedback)")
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_new_tokens=48),
                               description="judge sampling (default greedy)")
    min_score: float | None = Field(None, description="mode score: drop rows scored below this")
    min_gap: float = Field(1.0, ge=0, description="mode pairs: least score difference of chosen over rejected")
    kto_threshold: float | None = Field(None, description="mode kto: desirable when score >= this "
                                                          "(default 7 on the rubric, 4 on UltraFeedback)")
    reuse_scores: bool = Field(True, description="keep scores rows already carry instead of judging them again")

    @field_validator("template")
    @classmethod
    def _template_parses(cls, value: str) -> str:
        check_jinja(value)
        return value


def parse_score(reply: str | None, scale: tuple[float, float]) -> float | None:
    """The score in a rubric judge's reply, or None when there is none within ``scale``."""
    if reply is None:
        return None
    match = _SCORE.search(reply) or _BARE.match(reply)
    if match is None:
        return None
    value = float(match.group(1))
    return value if scale[0] <= value <= scale[1] else None


class Judge:
    """Turns (instruction, response) into a judge conversation and the judge's reply into a score."""

    def __init__(self, params: JudgeParams):
        self.scale = SCALES[params.prompt]
        if params.prompt == "ultrafeedback":
            self._task = distilabel_task("UltraFeedback", aspect=params.aspect)
        else:
            import jinja2

            self._template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(params.template)
            self._rubric = params.rubric
            self._prefill = params.prefill
            self._task = None

    def conversation(self, instruction: str, response: str) -> list[dict]:
        if self._task is not None:
            return self._task.format_input({"instruction": instruction, "generations": [response]})
        content = self._template.render(instruction=instruction, response=response, rubric=self._rubric)
        conversation = [{"role": "user", "content": content}]
        if self._prefill:
            conversation.append({"role": "assistant", "content": self._prefill})
        return conversation

    def score(self, instruction: str, response: str, reply: str | None) -> float | None:
        if self._task is None:
            return parse_score(None if reply is None else f"{self._prefill} {reply}", self.scale)
        if reply is None:
            return None
        try:  # distilabel's parser raises on some malformed replies ("Rating: good"), as its Task expects
            parsed = self._task.format_output(reply, {"instruction": instruction, "generations": [response]})
            rating = parsed["ratings"][0]
        except (IndexError, KeyError, ValueError, TypeError):
            return None
        return float(rating) if rating is not None and self.scale[0] <= rating <= self.scale[1] else None


@dataclass
class Candidate:
    """A reply to judge: the prompt it answers, its text, and the score once known."""

    prompt: list[dict]
    instruction: str
    response: str
    score: float | None = None
    reply: str | None = None  # the judge's raw reply, when it was asked


@dataclass
class JudgeCounts:
    judged: int = 0  # candidates sent to the judge (or found in the row cache)
    reused: int = 0  # candidates that already carried a score
    failed_calls: int = 0  # no reply from the judge
    malformed: int = 0  # a reply without a score in range
    scores: list[float] = field(default_factory=list)

    def as_metrics(self) -> dict[str, float]:
        mean = sum(self.scores) / len(self.scores) if self.scores else 0.0
        return {"judged": self.judged, "reused_scores": self.reused, "failed_calls": self.failed_calls,
                "malformed": self.malformed, "mean_score": mean}


def candidates_of(rows: list[Row], mode: str, reuse_scores: bool) -> dict[str, Candidate]:
    """Distinct (prompt, reply) candidates by key, in first-appearance order."""
    found: dict[str, Candidate] = {}
    for row in rows:
        prompt, reply = prompt_and_reference(row)
        replies = [reply] + ([row["rejected"]] if mode == "pairs" and "rejected" in row else [])
        for index, text in enumerate(replies):
            key = candidate_key(prompt, text)
            if key not in found:
                found[key] = Candidate(prompt, instruction_of(row), text)
            score = row.get("score")
            if index == 0 and reuse_scores and score is not None and found[key].score is None:
                found[key].score = float(score)
    return found


def candidate_key(prompt: list[dict], response: str) -> str:
    return canonical_json([prompt, response])


def apply_judge_replies(judge: Judge, pending: list[Candidate], replies: list[str | None], counts: JudgeCounts) -> None:
    """Parse each reply into its candidate's score; missing and malformed replies are counted."""
    for candidate, reply in zip(pending, replies):
        candidate.reply = reply
        candidate.score = judge.score(candidate.instruction, candidate.response, reply)
        if reply is None:
            counts.failed_calls += 1
        elif candidate.score is None:
            counts.malformed += 1


def scored_rows(rows: list[Row], candidates: dict[str, Candidate], min_score: float | None) -> tuple[list[Row], int]:
    """Mode score: rows with their score; unscored rows dropped, and rows below ``min_score`` (counted)."""
    kept, below = [], 0
    for row in rows:
        prompt, reply = prompt_and_reference(row)
        score = candidates[candidate_key(prompt, reply)].score
        if score is None:
            continue
        if min_score is not None and score < min_score:
            below += 1
            continue
        kept.append({**row, "score": score})
    return kept, below


def preference_pairs(candidates: dict[str, Candidate], min_gap: float) -> tuple[list[Row], dict[str, int]]:
    """Mode pairs: per prompt, best vs worst scored reply when they differ by at least ``min_gap``.

    Ties go to the earliest candidate for chosen and the latest for rejected, so the choice is
    deterministic and never pairs a reply with itself.
    """
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates.values():
        if candidate.score is not None:
            groups.setdefault(canonical_json(candidate.prompt), []).append(candidate)
    rows, single, small_gap = [], 0, 0
    for group in groups.values():
        if len(group) < 2:
            single += 1
            continue
        chosen = max(group, key=lambda c: c.score)  # first maximum
        rejected = min(reversed(group), key=lambda c: c.score)  # last minimum
        if chosen is rejected or chosen.score - rejected.score < min_gap:
            small_gap += 1
            continue
        messages = chosen.prompt + [{"role": "assistant", "content": chosen.response}]
        rows.append({"id": derived_id(messages, {"rejected": rejected.response}), "messages": messages,
                     "rejected": rejected.response})
    return rows, {"pairs": len(rows), "prompts_single_reply": single, "prompts_small_gap": small_gap}


def kto_rows(rows: list[Row], candidates: dict[str, Candidate], threshold: float) -> tuple[list[Row], dict[str, int]]:
    """Mode kto: each scored row labelled desirable when its score reaches ``threshold``."""
    labelled = []
    for row in rows:
        prompt, reply = prompt_and_reference(row)
        score = candidates[candidate_key(prompt, reply)].score
        if score is not None:
            labelled.append({"id": row["id"], "messages": row["messages"], "label": score >= threshold, "score": score})
    desirable = sum(row["label"] for row in labelled)
    return labelled, {"desirable": desirable, "undesirable": len(labelled) - desirable}


@stage("judge", params=JudgeParams, produces="dataset",
       inputs=(InputSlot("dataset", ("dataset",)), InputSlot("judge", ("model",), optional=True)),
       summary_metrics=("rows", "mean_score", "malformed"))
def judge(params: JudgeParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """LLM judge: score replies on a rubric; write scored rows, preference pairs or KTO labels."""
    rows = read_rows(inputs["dataset"])
    judge_prompt = Judge(params)
    candidates = candidates_of(rows, params.mode, params.reuse_scores)
    counts = JudgeCounts(reused=sum(c.score is not None for c in candidates.values()))
    pending = [c for c in candidates.values() if c.score is None]
    if pending:
        backend = open_backend(params.judge, inputs.get("judge"), stage=ctx.stage, role="judge",
                               workspace=ctx.workspace)
        ctx.info(f"judge: {backend.description}; {len(pending)} replies to score ({params.prompt}, mode {params.mode})")
        chat_counts = ChatCounts()
        requests = [chat_request("judge", judge_prompt.conversation(c.instruction, c.response)) for c in pending]
        distinct = list({r.key: r for r in requests}.values())  # two candidates may render to one prompt
        replies = cached_chat(backend, RowCache.for_stage(ctx), distinct, params.sampling, ctx.seed, chat_counts,
                              on_progress=lambda d, t: ctx.progress(d, t, "judging"))
        by_key = dict(zip((r.key for r in distinct), replies))
        apply_judge_replies(judge_prompt, pending, [by_key[r.key] for r in requests], counts)
        counts.judged = len(pending)
    counts.scores = [c.score for c in candidates.values() if c.score is not None]

    if params.mode == "score":
        output, below = scored_rows(rows, candidates, params.min_score)
        extra = {"below_min_score": below}
    elif params.mode == "pairs":
        output, extra = preference_pairs(candidates, params.min_gap)
    else:
        threshold = params.kto_threshold if params.kto_threshold is not None else DEFAULT_KTO_THRESHOLD[params.prompt]
        output, extra = kto_rows(rows, candidates, threshold)
    metrics = {"rows_in": len(rows), **counts.as_metrics(), **extra, "rows": len(output)}
    example = next((c.reply for c in pending if c.reply is not None and c.score is None), None)
    require_rows(output, ctx.stage, metrics, "a stronger judge, another template or lower thresholds may help"
                 + (f"; a judge reply without a score: {_excerpt(example)!r}" if example is not None else ""))
    write_rows(output, dataset_file(out))
    with open(out / JUDGEMENTS_FILE, "w", encoding="utf-8") as handle:
        for candidate in pending:
            handle.write(json.dumps({"instruction": candidate.instruction, "response": candidate.response,
                                     "score": candidate.score, "reply": candidate.reply},
                                    sort_keys=True, ensure_ascii=False) + "\n")
    return StageResult(metrics={k: float(v) for k, v in metrics.items()})


def _excerpt(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
