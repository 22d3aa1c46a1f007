"""Decontamination: find training rows that overlap an eval set, by word n-grams and by embedding similarity.

N-gram overlap (the GPT-3 paper's 13-gram test, https://arxiv.org/abs/2005.14165, appendix C):

- every eval item's texts (user and assistant messages, not the system prompt) give their
  ``n``-word windows; a text shorter than ``n`` words but at least ``min_words`` long is one gram
  of its own length, so short benchmark questions are caught whole (shorter ones are left to the
  embedding test: a 4-word question is too common to call a leak);
- boilerplate is left out: words inside a ``ceil(n/2)``-word gram that ``boilerplate_items`` or more
  eval items hold (2 by default) belong to a prompt template ("Name the capital city of the country
  below. Answer with only the answer."), and an eval window counts only if at least two of its
  words are the item's own. Without this, one template would flag every training row written
  from it. An item made of a template plus a few words of its own still leaks through the windows
  that hold two of them;
- a training row is contaminated when at least ``min_matches`` of its windows (user, assistant and
  rejected texts) are grams of one eval item. Words are case-folded ``\\w+`` runs
  (:mod:`tunegraph.data.text`); grams are compared by 64-bit hash (a chance collision among 10^7
  windows and 10^5 grams has probability ~10^-7).

Embedding similarity: the cosine of the all-MiniLM-L6-v2 embeddings of the training row's prompt
and the eval item's prompt (user turns); a row at or above ``threshold`` is contaminated (this
catches paraphrases, which share no long n-gram). Rows already caught by n-grams are not embedded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from tunegraph.data.text import (ROWS_PER_CHUNK, Tokens, WordHasher, content_segments, prompt_text, short_text_hashes,
                                 tokenize, window_hashes, windows, words)

NGRAM_REASON = "ngram_overlap"
EMBEDDING_REASON = "embedding_similarity"
_SIMILARITY_CHUNK = 4096  # training rows per block of the (rows x eval items) cosine matrix
# An eval window counts only with at least this many words outside the boilerplate: a window that is
# a template plus one word ("... answer with only the answer the") matches every row with that template.
MIN_OWN_WORDS = 2


@dataclass(frozen=True)
class Leak:
    """Training row ``id`` overlaps item ``eval_id`` of ``eval_set``; ``score`` is the number of shared
    n-grams (``ngram_overlap``) or the cosine similarity (``embedding_similarity``)."""

    id: str
    reason: str
    eval_set: str
    eval_id: str
    score: float
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NgramSettings:
    """``n`` words per gram; eval texts of ``min_words`` to ``n - 1`` words are grams whole; a row needs
    ``min_matches`` grams of one item (a whole short text counts as one); see the module docstring."""

    n: int = 13
    min_words: int = 8
    min_matches: int = 1
    boilerplate_items: int | None = 2  # a gram held by this many eval items is a template, not a leak


def _segments(rows: Sequence[dict]) -> tuple[list[str], np.ndarray]:
    """Every content text of ``rows`` and the row each belongs to."""
    texts, owner = [], []
    for index, row in enumerate(rows):
        for segment in content_segments(row):
            texts.append(segment)
            owner.append(index)
    return texts, np.array(owner, dtype=np.int64)


class NgramIndex:
    """The grams of an eval set, boilerplate left out: per gram length, the sorted distinct hashes and
    the lowest eval item holding each."""

    def __init__(self, eval_rows: Sequence[dict], settings: NgramSettings, hasher: WordHasher) -> None:
        self.settings = settings
        texts, owner = _segments(eval_rows)
        tokens = tokenize(texts, hasher)
        hashes, text_index, starts = windows(tokens, settings.n)
        items = owner[text_index]
        own = self._own_word_counts(tokens, owner, starts)
        keep = own >= min(MIN_OWN_WORDS, settings.n)
        self.by_length = {settings.n: self._table(hashes[keep], items[keep])}
        short, short_index = short_text_hashes(tokens, below=settings.n, at_least=settings.min_words)
        lengths = tokens.lengths[short_index]
        for length in np.unique(lengths):
            chosen = lengths == length
            self.by_length[int(length)] = self._table(short[chosen], owner[short_index[chosen]])

    def _own_word_counts(self, tokens: Tokens, text_owner: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """For each n-word window (by ``starts``), how many of its words are the item's own: not inside
        any ``template_words(n)``-gram that ``boilerplate_items`` or more eval items hold."""
        n, m = self.settings.n, template_words(self.settings.n)
        template = np.zeros(len(tokens.values) + 1, dtype=np.int64)
        if self.settings.boilerplate_items:
            short_hashes, short_text, short_starts = windows(tokens, m)
            shared = _holders(short_hashes, text_owner[short_text]) >= self.settings.boilerplate_items
            np.add.at(template, short_starts[shared], 1)       # +1 where a shared m-gram starts,
            np.add.at(template, short_starts[shared] + m, -1)  # -1 where it ends: cumsum > 0 inside one
        own = np.concatenate([[0], np.cumsum(np.cumsum(template[:-1]) == 0)])
        return own[starts + n] - own[starts]

    def _table(self, hashes: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct gram hashes and the lowest item holding each, without boilerplate grams."""
        order = np.lexsort((items, hashes))  # by hash, then item
        hashes, items = hashes[order], items[order]
        distinct = np.ones(len(hashes), dtype=bool)
        distinct[1:] = (hashes[1:] != hashes[:-1]) | (items[1:] != items[:-1])
        hashes, items = hashes[distinct], items[distinct]
        grams, first, holders = np.unique(hashes, return_index=True, return_counts=True)
        kept = holders < (self.settings.boilerplate_items or len(items) + 1)
        return grams[kept], items[first[kept]]

    def matches(self, tokens: Tokens, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row, eval item, shared grams)`` for every (training row, eval item) pair sharing a gram."""
        pair_rows, pair_items = [], []
        for length, (grams, items) in self.by_length.items():
            if not len(grams):
                continue
            hashes, text_index = window_hashes(tokens, length)
            position = np.minimum(np.searchsorted(grams, hashes), len(grams) - 1)
            hit = grams[position] == hashes
            # a window repeated inside one text counts once: distinct (row, gram) pairs
            found = np.unique(np.stack([owner[text_index[hit]], position[hit].astype(np.int64)]), axis=1) \
                if hit.any() else np.zeros((2, 0), dtype=np.int64)
            pair_rows.append(found[0])
            pair_items.append(items[found[1]])
        if not pair_rows:
            return (np.zeros(0, np.int64),) * 3
        pairs, counts = np.unique(np.stack([np.concatenate(pair_rows), np.concatenate(pair_items)]), axis=1,
                                  return_counts=True)
        return pairs[0], pairs[1], counts


def template_words(n: int) -> int:
    """Length of the grams that detect boilerplate: half of ``n`` (7 for 13), so templates shorter than
    ``n`` words are found too."""
    return max(1, -(-n // 2))


def _holders(hashes: np.ndarray, items: np.ndarray) -> np.ndarray:
    """For each window, the number of distinct eval items holding its gram."""
    pairs = np.unique(np.stack([hashes, items.astype(np.uint64)]), axis=1)
    grams, counts = np.unique(pairs[0], return_counts=True)
    return counts[np.searchsorted(grams, hashes)]


def ngram_leaks(rows: Sequence[dict], eval_name: str, eval_rows: Sequence[dict],
                settings: NgramSettings = NgramSettings()) -> list[Leak]:
    """Training rows sharing at least ``min_matches`` grams with one eval item (the item sharing most)."""
    hasher = WordHasher()
    index = NgramIndex(eval_rows, settings, hasher)
    best: dict[int, tuple[int, int]] = {}
    for start in range(0, len(rows), ROWS_PER_CHUNK):  # chunks bound the memory of the token arrays
        texts, owner = _segments(rows[start:start + ROWS_PER_CHUNK])
        row_index, item_index, counts = index.matches(tokenize(texts, hasher), owner + start)
        for row, item, count in zip(row_index.tolist(), item_index.tolist(), counts.tolist()):
            if count >= settings.min_matches and (row not in best or count > best[row][1]):
                best[row] = (item, count)  # pairs come sorted by item: ties keep the lowest item
    leaks = []
    for row, (item, count) in sorted(best.items()):
        example = _shared_text(rows[row], item, index, hasher)
        leaks.append(Leak(rows[row]["id"], NGRAM_REASON, eval_name, eval_rows[item]["id"], float(count),
                          f"{count} shared word {settings.n}-gram(s) or short eval text(s), e.g. {example!r}"))
    return leaks


def _shared_text(row: dict, item: int, index: NgramIndex, hasher: WordHasher) -> str:
    """One gram the row shares with eval item ``item``, as words (for the report; this row only)."""
    for text in content_segments(row):
        tokens = tokenize([text], hasher)
        for length, (grams, items) in index.by_length.items():
            hashes, _ = window_hashes(tokens, length)
            hit = np.flatnonzero(np.isin(hashes, grams[items == item]))
            if len(hit):
                return " ".join(words(text)[hit[0]:hit[0] + length])
    return ""


Embed = Callable[[Sequence[str]], np.ndarray]


def embedding_leaks(rows: Sequence[dict], eval_name: str, eval_rows: Sequence[dict], embed: Embed,
                    threshold: float) -> list[Leak]:
    """Training rows whose prompt embedding has cosine >= ``threshold`` with an eval item's prompt."""
    if not rows or not eval_rows:
        return []
    eval_vectors = embed([prompt_text(row) for row in eval_rows])
    row_vectors = embed([prompt_text(row) for row in rows])
    leaks = []
    for start in range(0, len(rows), _SIMILARITY_CHUNK):
        similarity = row_vectors[start:start + _SIMILARITY_CHUNK] @ eval_vectors.T
        best_item = similarity.argmax(axis=1)
        best = similarity[np.arange(len(best_item)), best_item]
        for offset in np.flatnonzero(best >= threshold):
            row, item = rows[start + offset], eval_rows[int(best_item[offset])]
            leaks.append(Leak(row["id"], EMBEDDING_REASON, eval_name, item["id"], round(float(best[offset]), 4),
                              f"prompt cosine similarity {best[offset]:.3f} >= {threshold} with the eval prompt"))
    return leaks


def eval_items_hit(leaks: Sequence[Leak]) -> int:
    return len({leak.eval_id for leak in leaks})
