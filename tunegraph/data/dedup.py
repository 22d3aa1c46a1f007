"""Duplicate removal: exact (hash of the normalized content) and near (MinHash-LSH on word shingles).

Both keep the *first* row of each group in dataset order and remove the later ones, so the result
depends only on the rows and the seed.

Near duplicates follow Broder's MinHash (https://doi.org/10.1109/SEQUEN.1997.666900) with LSH
banding (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3), via ``datasketch``:

- a row's shingles are the hashes of its ``k``-word windows (:mod:`tunegraph.data.text`; a text
  shorter than ``k`` words is one shingle), so its content is a set ``S``;
- ``J(A, B) = |A ∩ B| / |A ∪ B|``; a MinHash signature of ``num_perm`` minima estimates it, and
  LSH with ``b`` bands of ``r`` rows (datasketch picks them for ``threshold``) returns, for each
  row, the earlier kept rows likely to have ``J >= threshold``;
- each candidate is then checked with the *exact* Jaccard of the two shingle sets, so LSH only
  decides which pairs are compared, never which rows are removed. A false candidate costs one set
  intersection, a missed one a duplicate left in: the bands are chosen with false negatives weighted
  0.95 (datasketch's default 0.5 finds only ~40% of pairs at exactly ``J = threshold``; this ~95%).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tunegraph.data.removals import Removal
from tunegraph.data.text import (ROWS_PER_CHUNK, Tokens, WordHasher, content_segments, normalized, short_text_hashes,
                                 tokenize, window_hashes)

EXACT_REASON = "exact_duplicate"
NEAR_REASON = "near_duplicate"
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative) weights for choosing the LSH bands


def exact_key(row: dict) -> str:
    """sha256 of the row's normalized content segments (case, punctuation and spacing ignored)."""
    text = "\x1e".join(normalized(segment) for segment in content_segments(row))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def exact_duplicate_removals(rows: list[dict]) -> list[Removal]:
    """Rows whose normalized content equals an earlier row's."""
    first: dict[str, str] = {}
    removals = []
    for row in rows:
        key = exact_key(row)
        if key in first:
            removals.append(Removal(row["id"], EXACT_REASON, f"same normalized text as {first[key]}"))
        else:
            first[key] = row["id"]
    return removals


@dataclass(frozen=True)
class NearDedupSettings:
    threshold: float = 0.8   # Jaccard similarity of shingle sets at or above which a row is a duplicate
    shingle_words: int = 3
    num_perm: int = 128
    seed: int = 1


def shingle_sets(rows: list[dict], shingle_words: int) -> list[np.ndarray]:
    """Each row's shingles: sorted distinct 32-bit hashes of its ``shingle_words``-word windows."""
    hasher = WordHasher()
    sets: list[np.ndarray] = []
    for start in range(0, len(rows), ROWS_PER_CHUNK):  # chunks bound the memory of the token arrays
        sets.extend(_chunk_shingle_sets(rows[start:start + ROWS_PER_CHUNK], shingle_words, hasher))
    return sets


def _chunk_shingle_sets(rows: list[dict], shingle_words: int, hasher: WordHasher) -> list[np.ndarray]:
    segments, owner = [], []
    for index, row in enumerate(rows):
        for segment in content_segments(row):
            segments.append(segment)
            owner.append(index)
    hashes, texts = _all_shingles(tokenize(segments, hasher), shingle_words)
    folded = ((hashes ^ (hashes >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    row_of = np.array(owner, dtype=np.int64)[texts]
    order = np.lexsort((folded, row_of))
    folded, row_of = folded[order], row_of[order]
    distinct = np.ones(len(folded), dtype=bool)
    distinct[1:] = (folded[1:] != folded[:-1]) | (row_of[1:] != row_of[:-1])
    folded, row_of = folded[distinct], row_of[distinct]
    bounds = np.searchsorted(row_of, np.arange(len(rows) + 1))
    return [folded[bounds[i]:bounds[i + 1]] for i in range(len(rows))]


def _all_shingles(tokens: Tokens, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-word windows of every text, plus one whole-text shingle for each text shorter than k words."""
    windows, texts = window_hashes(tokens, k)
    short, short_texts = short_text_hashes(tokens, below=k)
    return np.concatenate([windows, short]), np.concatenate([texts, short_texts])


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of distinct values."""
    if not len(a) and not len(b):
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def near_duplicate_removals(rows: list[dict], settings: NearDedupSettings = NearDedupSettings()) -> list[Removal]:
    """Rows whose shingle set has Jaccard >= ``threshold`` with an earlier *kept* row."""
    from datasketch import MinHash, MinHashLSH

    sets = shingle_sets(rows, settings.shingle_words)
    # the shingles are already well-mixed 32-bit hashes: datasketch applies its permutations to them as given
    signatures = MinHash.generator((s.tolist() for s in sets), num_perm=settings.num_perm, seed=settings.seed,
                                   hashfunc=_identity)
    index = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm, weights=LSH_WEIGHTS)
    removals = []
    for position, (row, shingles, signature) in enumerate(zip(rows, sets, signatures)):
        if not len(shingles):
            continue  # no words at all: nothing to compare (the heuristics' empty_reply rule sees it)
        best, best_similarity = None, -1.0
        for candidate in sorted(index.query(signature)):
            similarity = jaccard(shingles, sets[candidate])
            if similarity >= settings.threshold and similarity > best_similarity:
                best, best_similarity = candidate, similarity
        if best is None:
            index.insert(position, signature, check_duplication=False)
        else:
            removals.append(Removal(row["id"], NEAR_REASON, f"near-duplicate of {rows[best]['id']} (Jaccard "
                                    f"{best_similarity:.2f} of {settings.shingle_words}-word shingles)"))
    return removals


def _identity(value: int) -> int:
    return value
