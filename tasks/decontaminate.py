"""Stage kind ``decontaminate``: remove training rows that overlap an eval set, and report each one.

Inputs: ``dataset`` (the training rows) and ``eval`` (an eval dataset: the same ``load_dataset``
artifact an ``evaluate`` stage reads). A row is contaminated when it shares a word ``n``-gram (or
a whole short eval text) with an eval item, or when its prompt's MiniLM embedding has cosine
>= ``embedding_threshold`` with an eval prompt (:mod:`tunegraph.data.decontaminate`).

Writes ``data.jsonl`` (clean rows), ``contamination.jsonl`` (``id``, ``reason``, ``eval_set``,
``eval_id``, ``score``, ``detail``), ``removed.jsonl`` and the data card. When more than
``max_contamination`` of the rows overlap one eval set the stage fails instead: that much overlap
means the data source itself is suspect, and removing rows silently would hide it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field

from tunegraph.chat_data import dataset_file, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.data.data_card import CardInputs, write_data_card
from tunegraph.data.decontaminate import (EMBEDDING_REASON, NGRAM_REASON, Embed, Leak, NgramSettings,
                                         embedding_leaks, eval_items_hit, ngram_leaks)
from tunegraph.data.removals import REMOVED_FILE, Funnel, Removal, keep_rows, write_removals
from tunegraph.errors import StageError
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage

REPORT_FILE = "contamination.jsonl"
EVAL_SLOT = "eval"


class DecontaminateParams(StageParams):
    n: int = Field(13, ge=1, description="words per n-gram")
    min_words: int = Field(8, ge=1, description="eval texts shorter than n words but at least this long match whole")
    min_matches: int = Field(1, ge=1, description="grams shared with one eval item that make a row contaminated "
                                                  "(a whole short eval text is one gram)")
    embedding_threshold: float | None = Field(
        0.95, gt=0, le=1, description="prompt cosine similarity that makes a row contaminated; null: n-grams only")
    max_contamination: float = Field(
        0.05, ge=0, le=1, description="fail when more than this fraction of rows overlaps one eval set")
    batch_size: int = Field(64, ge=1, description="texts per embedding batch")


def eval_sets(inputs: dict) -> list[tuple[str, Path]]:
    """(name, artifact dir) of each eval set, named after its upstream stage: the list-valued slot
    (``eval: [a, b]`` in the recipe, or one name) arrives as ``{stage: directory}``; a bare directory or
    list of directories (a direct call) is named after the directory."""
    value = inputs[EVAL_SLOT]
    if isinstance(value, Mapping):
        return [(str(name), Path(path)) for name, path in value.items()]
    paths = list(value) if isinstance(value, (list, tuple)) else [value]
    return [(Path(path).name, Path(path)) for path in paths]


def check_contamination(leaks: list[Leak], eval_name: str, eval_size: int, rows: int, limit: float) -> None:
    """Fail the stage when more than ``limit`` of the ``rows`` overlap the eval set ``eval_name``."""
    if rows and len(leaks) / rows > limit:
        examples = ", ".join(f"{leak.id}~{leak.eval_id}" for leak in leaks[:3])
        raise StageError(f"decontaminate: {len(leaks)} of {rows} rows ({len(leaks) / rows:.1%}) overlap eval set "
                         f"{eval_name!r} ({eval_items_hit(leaks)} of its {eval_size} items), above max_contamination "
                         f"{limit} (e.g. {examples}); check that the training data does not come from the eval set, "
                         "or raise max_contamination to remove them and go on")


def embedding_function(batch_size: int, ctx: StageContext) -> Embed:
    """MiniLM embeddings with progress lines; one model (and one per-text cache) for all eval sets."""
    from tunegraph.data.embedder import Embedder

    embedder = Embedder(batch_size)

    def embed(texts):
        return embedder.embed(texts, lambda done, total: ctx.progress(done, total, "embedding"))

    return embed


def leaks_against(rows: list[dict], name: str, eval_rows: list[dict], params: DecontaminateParams,
                  embed: Embed | None) -> list[Leak]:
    """Rows overlapping one eval set: by n-grams, then (if ``embed``) the rest by prompt embeddings."""
    found = ngram_leaks(rows, name, eval_rows, NgramSettings(params.n, params.min_words, params.min_matches))
    if embed is not None:
        caught = {leak.id for leak in found}
        unchecked = [row for row in rows if row["id"] not in caught]
        found += embedding_leaks(unchecked, name, eval_rows, embed, params.embedding_threshold)
    return found


def removal_funnel(rows: list[dict], leaks: list[Leak]) -> tuple[Funnel, list[dict]]:
    """The funnel (n-gram step, then embedding step) and the rows left; a row overlapping several eval
    sets is removed once, for the first leak found."""
    first_leak: dict[str, Leak] = {}
    for leak in leaks:
        first_leak.setdefault(leak.id, leak)
    funnel = Funnel(rows_in=len(rows))
    for reason in (NGRAM_REASON, EMBEDDING_REASON):
        removed = [Removal(leak.id, reason, f"{leak.eval_set}/{leak.eval_id}: {leak.detail}")
                   for leak in first_leak.values() if leak.reason == reason]
        rows = keep_rows(rows, removed)
        funnel.record(reason, len(rows), removed)
    return funnel, rows


@stage("decontaminate", params=DecontaminateParams, produces="dataset",
       inputs=(InputSlot("dataset", ("dataset",)), InputSlot(EVAL_SLOT, ("dataset",), many=True)),
       summary_metrics=("rows", "contaminated"))
def decontaminate(params: DecontaminateParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Drop rows overlapping the eval set(s) by n-grams or embeddings; report them; fail above the limit."""
    rows_in = read_rows(inputs["dataset"])
    embed = embedding_function(params.batch_size, ctx) if params.embedding_threshold is not None else None
    leaks: list[Leak] = []
    metrics: dict[str, float] = {}
    for name, path in eval_sets(inputs):
        eval_rows = read_rows(path)
        found = leaks_against(rows_in, name, eval_rows, params, embed)
        check_contamination(found, name, len(eval_rows), len(rows_in), params.max_contamination)
        metrics[f"contaminated_{name}"] = float(len(found))
        metrics[f"eval_items_hit_{name}"] = float(eval_items_hit(found))
        leaks += found
    funnel, rows = removal_funnel(rows_in, leaks)
    write_rows(rows, dataset_file(out))
    (out / REPORT_FILE).write_text("".join(json.dumps(leak.as_dict(), sort_keys=True, ensure_ascii=False) + "\n"
                                           for leak in leaks), encoding="utf-8")
    write_removals(funnel.removals, out / REMOVED_FILE)
    card_settings = {**params.fingerprint_params(), "eval_sets": [name for name, _ in eval_sets(inputs)]}
    write_data_card(out, CardInputs(ctx.stage, funnel, rows_in, rows, card_settings))
    metrics.update({"rows_in": float(len(rows_in)), "rows": float(len(rows)),
                    "contaminated": float(len(rows_in) - len(rows))})
    return StageResult(metrics=metrics)
