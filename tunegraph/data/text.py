"""The text of a row as the filters see it, its normalization, and word n-gram hashes in numpy.

- A row's *content* is its user and assistant messages plus a preference row's ``rejected`` reply.
  System prompts are left out: they are boilerplate shared by many rows, and counting them would
  make every row a near-duplicate (or a benchmark leak) of every other.
- *Words* are the ``\\w+`` runs of the NFKC-normalized, case-folded text: punctuation, case and
  spacing never make two texts differ.
- Each distinct word gets a stable 64-bit hash (blake2b, not Python's per-process ``hash``), so
  n-gram hashes are the same in every process. The hash of the n-gram ``w_0 .. w_{n-1}`` is the
  polynomial ``sum_j h(w_j) * P^(n-1-j) mod 2^64``, computed for all windows of many texts at once
  with numpy (uint64 arithmetic wraps, which *is* the mod 2^64).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

import numpy as np

WORD = re.compile(r"\w+")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit multiplier (the golden-ratio constant)
# Rows tokenized at a time by the n-gram filters: bounds the flat word-hash arrays (~100 words a row).
ROWS_PER_CHUNK = 10_000


# --------------------------------------------------------------------------- what text a row holds


def user_texts(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "user"]


def assistant_texts(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def prompt_text(row: dict) -> str:
    """The user turns of a row, one per line (what a benchmark question would leak into)."""
    return "\n".join(user_texts(row))


def reply_text(row: dict) -> str:
    """The final assistant message (the reference answer or chosen reply)."""
    return row["messages"][-1]["content"]


def content_segments(row: dict) -> list[str]:
    """User and assistant messages in order, then ``rejected`` if present (no system prompt)."""
    segments = [m["content"] for m in row["messages"] if m["role"] != "system"]
    if isinstance(row.get("rejected"), str):
        segments.append(row["rejected"])
    return segments


# --------------------------------------------------------------------------- normalization


def words(text: str) -> list[str]:
    """The words of ``text``: ``\\w+`` runs of its NFKC, case-folded form."""
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def normalized(text: str) -> str:
    """``text`` reduced to its words separated by single spaces."""
    return " ".join(words(text))


# --------------------------------------------------------------------------- n-gram hashes


class WordHasher:
    """Stable 64-bit hashes of words, cached (a corpus has far fewer distinct words than words)."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, word: str) -> int:
        value = self._cache.get(word)
        if value is None:
            value = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
            self._cache[word] = value
        return value

    def hashes(self, text: str) -> list[int]:
        cache, compute = self._cache, self.__call__
        return [cache[w] if w in cache else compute(w) for w in words(text)]


@dataclass(frozen=True)
class Tokens:
    """Word hashes of many texts, flat: text ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray   # uint64
    offsets: np.ndarray  # int64, one more than the number of texts

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def tokenize(texts: Iterable[str], hasher: WordHasher | None = None) -> Tokens:
    """The :class:`Tokens` of ``texts`` (word hashes, flat)."""
    hasher = hasher or WordHasher()
    flat: list[int] = []
    offsets = [0]
    for text in texts:
        flat.extend(hasher.hashes(text))
        offsets.append(len(flat))
    return Tokens(np.array(flat, dtype=np.uint64), np.array(offsets, dtype=np.int64))


def windows(tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hashes, text_index, start)`` of every window of ``n`` consecutive words inside one text;
    ``start`` is the window's first position in ``tokens.values``.

    Windows are computed over the flat array and those that cross a text boundary are dropped.
    """
    values = tokens.values
    count = len(values) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    with np.errstate(over="ignore"):
        hashes = values[:count].copy()
        for j in range(1, n):
            hashes *= _POLY
            hashes += values[j:j + count]
    text_of_position = np.repeat(np.arange(len(tokens), dtype=np.int64), tokens.lengths)
    inside = np.flatnonzero(text_of_position[:count] == text_of_position[n - 1:n - 1 + count])
    return hashes[inside], text_of_position[inside], inside


def window_hashes(tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, text_index)`` of every window of ``n`` consecutive words inside one text."""
    hashes, text_index, _ = windows(tokens, n)
    return hashes, text_index


def sequence_hash(values: np.ndarray) -> int:
    """The hash of one whole word sequence, equal to its :func:`window_hashes` at ``n = len``."""
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for value in values:
            total = total * _POLY + value
    return int(total)


def short_text_hashes(tokens: Tokens, below: int, at_least: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, text_index)`` of the whole word sequence of each text with ``at_least <= words < below``.

    Short texts have no ``below``-word window; this gives each of them one gram of its own length.
    """
    lengths = tokens.lengths
    chosen = np.flatnonzero((lengths >= max(at_least, 1)) & (lengths < below))
    hashes = [sequence_hash(tokens.values[tokens.offsets[i]:tokens.offsets[i + 1]]) for i in chosen]
    return np.array(hashes, dtype=np.uint64), chosen.astype(np.int64)
