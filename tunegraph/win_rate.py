"""Pairwise LLM-judge win rate of a model against a baseline's answers, judged in both orders.

For each eval prompt the judge sees the model's answer and the baseline's stored answer twice: as
assistants A/B, then swapped as B/A. LLM judges favour a position (usually the first), so a single
order measures the judge as much as the model. Following MT-Bench (Zheng et al. 2023, "Judging
LLM-as-a-Judge", https://arxiv.org/abs/2306.05685, section 3.4 "position bias" and its conservative
swap rule), a verdict counts only when it survives the swap: the model *wins* when the judge prefers
it in both orders, *loses* when it prefers the baseline in both, and every other consistent or
inconsistent pair is a *tie* (inconsistent pairs are also counted, ``judge_inconsistent``). A judge
that always answers "A" therefore gives ties only, never wins.

The judge replies ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie), MT-Bench's pairwise format; the reply is
prefilled with ``[[`` so small local judges answer with a letter. A reply without exactly one verdict,
or no reply at all, drops that item from the rates and is counted (``judge_malformed``,
``judge_failed_calls``, ``judge_dropped``); it never stops the stage.

Judges also prefer longer answers (Dubois et al. 2024, length-controlled AlpacaEval,
https://arxiv.org/abs/2404.04475): ``judge_length_ratio`` (mean model answer length over mean baseline
answer length, in characters, over the compared items) says how much of a win rate may be verbosity.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from tunegraph.llm_backend import ChatBackend, Sampling
from tunegraph.row_cache import RowCache, cached_chat, chat_request

PAIRWISE_TEMPLATE = """\
Please act as an impartial judge and compare the two answers that two AI assistants gave to the user \
question below. Choose the answer that follows the instruction and answers the question better \
(helpful, relevant, accurate). The order of the answers and their length must not influence you.

[User Question]
{{ instruction }}

[The Start of Assistant A's Answer]
{{ answer_a }}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{{ answer_b }}
[The End of Assistant B's Answer]

Give your verdict first, strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if \
assistant B is better, "[[C]]" for a tie; then one short sentence explaining why."""

TEMPLATE_FIELDS = ("instruction", "answer_a", "answer_b")
VERDICTS_FILE = "pairwise.jsonl"
REPLIES_FILE = "pairwise_replies.jsonl"

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss"]
# "[[A]]", "[[ B ]]", "[[C", "[[tie]]": a verdict in double brackets, closed or at the end of the reply.
_BRACKETED = re.compile(r"\[\[\s*(A|B|C|[Tt]ie)\s*(?:\]\]|$)")
# A reply that is a verdict alone: "A", "B.", "Tie", "Assistant A".
_BARE = re.compile(r"^\s*(?:Assistant\s+)?(A|B|C|[Tt]ie)\s*[.!]?\s*$")


def check_template(text: str) -> None:
    """Raise ValueError unless ``text`` is a Jinja2 template that shows the judge both answers."""
    import jinja2
    from jinja2 import meta

    try:
        names = meta.find_undeclared_variables(jinja2.Environment().parse(text))
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"not a valid Jinja2 template: {exc.message} (line {exc.lineno})") from None
    missing = [name for name in ("answer_a", "answer_b") if name not in names]
    if missing:
        raise ValueError(f"the pairwise judge template must show both answers; it lacks {', '.join(missing)} "
                         f"(variables: {', '.join(TEMPLATE_FIELDS)})")


def parse_verdict(reply: str | None, prefill: str = "") -> Verdict | None:
    """The verdict in a judge reply (continuing ``prefill``), or None: no reply, no verdict, or two different ones."""
    if reply is None:
        return None
    found = {match.group(1) for match in _BRACKETED.finditer(f"{prefill} {reply}" if prefill else reply)}
    if not found:
        bare = _BARE.match(reply)
        found = {bare.group(1)} if bare else set()
    verdicts = {"tie" if value in ("C", "tie", "Tie") else value for value in found}
    return verdicts.pop() if len(verdicts) == 1 else None


def model_view(verdict: Verdict, model_is_a: bool) -> Outcome:
    """A verdict about positions, as an outcome for the model."""
    if verdict == "tie":
        return "tie"
    return "win" if (verdict == "A") == model_is_a else "loss"


def combine_orders(model_first: Verdict | None, model_second: Verdict | None) -> Outcome | None:
    """The item's outcome from the A/B verdict (model is A) and the B/A verdict (model is B); None: dropped.

    MT-Bench's conservative rule: the outcome is the one both orders agree on, else a tie."""
    if model_first is None or model_second is None:
        return None
    first, second = model_view(model_first, True), model_view(model_second, False)
    return first if first == second else "tie"


@dataclass
class Pair:
    """One eval item: the model's and the baseline's answers, the judge's replies in both orders, the outcome."""

    id: str
    instruction: str
    answer: str
    baseline_answer: str
    reply_ab: str | None = None  # model is A
    reply_ba: str | None = None  # model is B
    verdict_ab: Verdict | None = None
    verdict_ba: Verdict | None = None
    outcome: Outcome | None = None

    @property
    def inconsistent(self) -> bool:
        return (self.outcome == "tie" and self.verdict_ab is not None and self.verdict_ba is not None
                and model_view(self.verdict_ab, True) != model_view(self.verdict_ba, False))


class PairwiseJudge:
    """Renders the pairwise prompt for one order and parses the judge's reply."""

    def __init__(self, template: str, prefill: str):
        import jinja2

        self._template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template)
        self.prefill = prefill

    def conversation(self, instruction: str, answer_a: str, answer_b: str) -> list[dict]:
        content = self._template.render(instruction=instruction, answer_a=answer_a, answer_b=answer_b)
        conversation = [{"role": "user", "content": content}]
        if self.prefill:
            conversation.append({"role": "assistant", "content": self.prefill})
        return conversation

    def verdict(self, reply: str | None) -> Verdict | None:
        return parse_verdict(reply, self.prefill)


def judge_pairs(backend: ChatBackend, judge: PairwiseJudge, pairs: list[Pair], cache: RowCache, sampling: Sampling,
                seed: int, on_progress: Callable[[int, int], None] | None = None) -> None:
    """Ask the judge about every pair in both orders and fill in replies, verdicts and outcomes.

    Identical prompts (two equal answers make A/B and B/A the same prompt) are asked once."""
    requests = []
    for pair in pairs:
        requests.append(chat_request("pairwise", judge.conversation(pair.instruction, pair.answer, pair.baseline_answer)))
        requests.append(chat_request("pairwise", judge.conversation(pair.instruction, pair.baseline_answer, pair.answer)))
    distinct = list({request.key: request for request in requests}.values())
    replies = dict(zip((r.key for r in distinct), cached_chat(backend, cache, distinct, sampling, seed,
                                                              on_progress=on_progress)))
    for index, pair in enumerate(pairs):
        pair.reply_ab, pair.reply_ba = replies[requests[2 * index].key], replies[requests[2 * index + 1].key]
        pair.verdict_ab, pair.verdict_ba = judge.verdict(pair.reply_ab), judge.verdict(pair.reply_ba)
        pair.outcome = combine_orders(pair.verdict_ab, pair.verdict_ba)


def win_rate_metrics(pairs: Sequence[Pair], unmatched: int = 0) -> dict[str, float]:
    """Win / tie / loss rates over the items with a verdict in both orders, and what was dropped and why.

    ``unmatched``: eval items the baseline has no answer for (not judged)."""
    compared = [pair for pair in pairs if pair.outcome is not None]
    replies = [reply for pair in pairs for reply in (pair.reply_ab, pair.reply_ba)]
    verdicts = [verdict for pair in pairs for verdict in (pair.verdict_ab, pair.verdict_ba)]
    metrics = {f"{outcome}_rate": sum(p.outcome == outcome for p in compared) / len(compared) if compared else 0.0
               for outcome in ("win", "tie", "loss")}
    model_chars = sum(len(p.answer) for p in compared)
    baseline_chars = sum(len(p.baseline_answer) for p in compared)
    metrics.update({
        "judge_compared": float(len(compared)),
        "judge_inconsistent": float(sum(p.inconsistent for p in compared)),
        "judge_dropped": float(len(pairs) - len(compared)),
        "judge_failed_calls": float(sum(reply is None for reply in replies)),
        "judge_malformed": float(sum(r is not None and v is None for r, v in zip(replies, verdicts))),
        "judge_unmatched": float(unmatched),
    })
    if compared and baseline_chars:
        metrics["judge_length_ratio"] = model_chars / baseline_chars
    return metrics


def baseline_answers(eval_dir: Path, predictions_file: str) -> dict[str, str] | None:
    """The baseline eval's stored answers by item id, or None when it has no per-item predictions."""
    path = eval_dir / predictions_file
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(row["id"]): row["answer"] for row in rows}


def question_text(prompt: list[dict]) -> str:
    """What the judge is shown as the question: the user message, or the whole dialogue when there are several turns."""
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def write_verdicts(pairs: Sequence[Pair], path: Path, contaminated: set[str] | None = None) -> None:
    """One JSON line per judged item: both answers, both raw replies, both verdicts, the outcome."""
    with open(path, "w", encoding="utf-8") as handle:
        for pair in pairs:
            line = asdict(pair)
            if contaminated is not None:
                line["contaminated"] = pair.id in contaminated
            handle.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
