"""Heuristic row filters: empty replies, refusals, repetitive replies, length bounds. Each rule has a reason name.

Rules run in this order and a row is removed for the first one it fails (the reason names are the
``reason`` field of ``removed.jsonl``):

- ``empty_reply``: an assistant message with no word characters;
- ``refusal``: an assistant message containing a refusal phrase (case-insensitive, curly quotes
  folded), e.g. "as an ai language model";
- ``repetitive_reply``: an assistant message whose word n-grams repeat too much: with ``T`` the
  number of its n-grams and ``U`` the number of distinct ones, the repeated fraction is
  ``1 - U / T`` (Gopher's duplicate n-gram idea, https://arxiv.org/abs/2112.11446, on words);
  only messages with at least ``repetition_min_words`` words are judged;
- ``reply_too_short`` / ``reply_too_long``: the final assistant message's length;
- ``prompt_too_long``: the length of the user turns together.

Lengths are in ``chars``, ``words`` or ``tokens`` (counted by a tokenizer the caller passes).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

from pydantic import Field

from tunegraph.data.removals import Removal
from tunegraph.data.text import assistant_texts, prompt_text, reply_text, words
from tunegraph.params import StageParams

LengthUnit = Literal["chars", "words", "tokens"]
LengthCounter = Callable[[Sequence[str]], list[int]]

DEFAULT_REFUSALS = (
    "as an ai language model",
    "as an ai model",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "i cannot help with that",
    "i can't help with that",
    "i can't assist with that",
    "i cannot assist with that",
    "i'm not able to help with that",
    "i am unable to comply",
    "i cannot fulfill this request",
    "i can't fulfill this request",
)


class LengthRules(StageParams):
    unit: LengthUnit = Field("chars", description="chars, words, or tokens of the model input's tokenizer")
    min_reply: int = Field(1, ge=0, description="shortest final assistant message kept")
    max_reply: int | None = Field(None, ge=1, description="longest final assistant message kept")
    max_prompt: int | None = Field(None, ge=1, description="longest prompt (user turns together) kept")


class HeuristicRules(StageParams):
    enabled: bool = True
    length: LengthRules = Field(default_factory=LengthRules)
    refusal_phrases: tuple[str, ...] = Field(DEFAULT_REFUSALS, description="[] turns the refusal rule off")
    max_repeated_ngram_fraction: float | None = Field(
        0.5, ge=0, le=1, description="repeated word n-gram fraction above which a reply is dropped; null: off")
    repetition_n: int = Field(3, ge=1, description="n of the repetition rule's word n-grams")
    repetition_min_words: int = Field(20, ge=1, description="shorter replies are not judged for repetition")


def character_counts(texts: Sequence[str]) -> list[int]:
    return [len(t) for t in texts]


def word_counts(texts: Sequence[str]) -> list[int]:
    return [len(words(t)) for t in texts]


def _fold_quotes(text: str) -> str:
    return text.casefold().replace("\u2019", "'").replace("\u2018", "'")


def repeated_ngram_fraction(text_words: list[str], n: int) -> float:
    """``1 - distinct / total`` over the word n-grams of a text (0 when it has none)."""
    grams = [tuple(text_words[i:i + n]) for i in range(len(text_words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _content_problem(replies: list[str], rules: HeuristicRules, refusals: tuple[str, ...]) -> tuple[str, str] | None:
    """(reason, detail) of the first content rule an assistant message fails, else None."""
    for index, text in enumerate(replies):
        reply_words = words(text)
        where = f"assistant message {index + 1} of {len(replies)}"
        if not reply_words:
            return "empty_reply", f"{where} has no words"
        folded = _fold_quotes(text)
        phrase = next((p for p in refusals if p in folded), None)
        if phrase is not None:
            return "refusal", f"{where} contains {phrase!r}"
        if rules.max_repeated_ngram_fraction is not None and len(reply_words) >= rules.repetition_min_words:
            fraction = repeated_ngram_fraction(reply_words, rules.repetition_n)
            if fraction > rules.max_repeated_ngram_fraction:
                return "repetitive_reply", (f"{where}: {fraction:.2f} of its {rules.repetition_n}-grams repeat "
                                            f"(max {rules.max_repeated_ngram_fraction})")
    return None


def heuristic_removals(rows: list[dict], rules: HeuristicRules, count_lengths: LengthCounter) -> list[Removal]:
    """One :class:`Removal` per row failing a rule; ``count_lengths`` measures texts in ``rules.length.unit``."""
    if not rules.enabled:
        return []
    refusals = tuple(_fold_quotes(p) for p in rules.refusal_phrases)
    bounds = rules.length
    reply_lengths = count_lengths([reply_text(row) for row in rows])
    prompt_lengths = count_lengths([prompt_text(row) for row in rows]) if bounds.max_prompt is not None else None
    removals = []
    for index, row in enumerate(rows):
        problem = _content_problem(assistant_texts(row), rules, refusals)
        reply_length = reply_lengths[index]
        if problem is None and reply_length < bounds.min_reply:
            problem = "reply_too_short", f"{reply_length} {bounds.unit} < min_reply {bounds.min_reply}"
        if problem is None and bounds.max_reply is not None and reply_length > bounds.max_reply:
            problem = "reply_too_long", f"{reply_length} {bounds.unit} > max_reply {bounds.max_reply}"
        if problem is None and prompt_lengths is not None and prompt_lengths[index] > bounds.max_prompt:
            problem = "prompt_too_long", f"{prompt_lengths[index]} {bounds.unit} > max_prompt {bounds.max_prompt}"
        if problem is not None:
            removals.append(Removal(row["id"], *problem))
    return removals
