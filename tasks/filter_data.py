"""Stage kind ``filter``: heuristic rules, exact and near-duplicate removal, optional diversity selection.

Steps run in this order, each on the rows the previous one kept; a step that is off is skipped:

1. ``heuristics``: empty, refusal, repetitive, too short/long rows (:mod:`tunegraph.data.heuristics`);
2. ``exact_dedup``: same normalized content as an earlier row;
3. ``near_dedup``: MinHash-LSH, Jaccard of word shingles >= ``threshold`` with an earlier kept row;
4. ``diversity``: keep ``select`` rows spread over k-means clusters of their MiniLM embeddings.

Writes ``data.jsonl`` (kept rows, order kept), ``removed.jsonl`` (``id``, ``reason``, ``detail``) and
the data card. With ``heuristics.length.unit: tokens`` the optional ``model`` input's tokenizer counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunegraph.chat_data import dataset_file, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.data.data_card import CardInputs, write_data_card
from tunegraph.data.dedup import NearDedupSettings, exact_duplicate_removals, near_duplicate_removals
from tunegraph.data.heuristics import HeuristicRules, LengthCounter, character_counts, heuristic_removals, word_counts
from tunegraph.data.removals import REMOVED_FILE, Funnel, Removal, keep_rows, write_removals
from tunegraph.data.text import content_segments, prompt_text
from tunegraph.errors import StageError
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage

DIVERSITY_REASON = "not_selected_for_diversity"


class DedupParams(StageParams):
    exact: bool = Field(True, description="drop rows whose normalized text equals an earlier row's")
    near: bool = Field(True, description="drop near-duplicates (MinHash-LSH)")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word shingles that makes a duplicate")
    shingle_words: int = Field(3, ge=1, description="words per shingle")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: a closer LSH, slower)")


class DiversityParams(StageParams):
    select: int | None = Field(None, ge=1, description="keep this many rows spread over clusters; null: off")
    clusters: int | None = Field(None, ge=1, description="k-means clusters; default: the square root of select")
    text: Literal["prompt", "conversation"] = Field("prompt", description="what is embedded")
    batch_size: int = Field(64, ge=1, description="texts per embedding batch")


class FilterParams(StageParams):
    heuristics: HeuristicRules = Field(default_factory=HeuristicRules)
    dedup: DedupParams = Field(default_factory=DedupParams)
    diversity: DiversityParams = Field(default_factory=DiversityParams)


def length_counter(rules: HeuristicRules, inputs: dict[str, Path]) -> LengthCounter:
    """Counts texts in the unit the rules ask for; ``tokens`` needs the ``model`` input's tokenizer."""
    unit = rules.length.unit
    if unit == "chars":
        return character_counts
    if unit == "words":
        return word_counts
    if "model" not in inputs:
        raise StageError("filter: heuristics.length.unit is 'tokens' but the stage has no 'model' input; add "
                         "inputs: {model: <stage>} (its tokenizer counts tokens) or use unit: chars or words")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])

    def token_counts(texts):
        counts = []
        for start in range(0, len(texts), 1000):
            encoded = tokenizer(list(texts[start:start + 1000]), add_special_tokens=False)["input_ids"]
            counts.extend(len(ids) for ids in encoded)
        return counts

    return token_counts


def diversity_removals(rows: list[dict], settings: DiversityParams, seed: int, ctx: StageContext) -> list[Removal]:
    """Rows left out of a selection of ``select`` rows spread over k-means clusters of their embeddings."""
    from tunegraph.data.diversity import diverse_subset
    from tunegraph.data.embedder import Embedder

    if settings.select is None or len(rows) <= settings.select:
        return []
    texts = [prompt_text(r) if settings.text == "prompt" else "\n".join(content_segments(r)) for r in rows]
    embeddings = Embedder(settings.batch_size).embed(texts, lambda done, total: ctx.progress(done, total, "embedding"))
    clusters = settings.clusters or max(1, round(math.sqrt(settings.select)))
    chosen, clustering = diverse_subset(embeddings, settings.select, clusters, seed)
    chosen_set = set(chosen.tolist())
    return [Removal(row["id"], DIVERSITY_REASON, f"cluster {int(clustering.labels[i])} of {len(clustering.centres)}")
            for i, row in enumerate(rows) if i not in chosen_set]


@stage("filter", params=FilterParams, produces="dataset",
       inputs=(InputSlot("dataset", ("dataset",)), InputSlot("model", ("model",), optional=True)),
       summary_metrics=("rows", "removed"))
def filter_data(params: FilterParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Filter a dataset: heuristics, exact and near dedup, diversity selection; write rows, removals, data card."""
    rows_in = read_rows(inputs["dataset"])
    funnel = Funnel(rows_in=len(rows_in))
    rows = rows_in
    steps = []
    if params.heuristics.enabled:
        counter = length_counter(params.heuristics, inputs)
        steps.append(("heuristics", lambda rs: heuristic_removals(rs, params.heuristics, counter)))
    if params.dedup.exact:
        steps.append(("exact_dedup", exact_duplicate_removals))
    if params.dedup.near:
        near = NearDedupSettings(params.dedup.threshold, params.dedup.shingle_words, params.dedup.num_perm, ctx.seed)
        steps.append(("near_dedup", lambda rs: near_duplicate_removals(rs, near)))
    if params.diversity.select is not None:
        steps.append(("diversity", lambda rs: diversity_removals(rs, params.diversity, ctx.seed, ctx)))
    for name, step in steps:
        removed = step(rows)
        rows = keep_rows(rows, removed)
        funnel.record(name, len(rows), removed)
        ctx.info(f"{name}: removed {len(removed)}, {len(rows)} rows left")
    write_rows(rows, dataset_file(out))
    write_removals(funnel.removals, out / REMOVED_FILE)
    write_data_card(out, CardInputs(ctx.stage, funnel, rows_in, rows, params.fingerprint_params()))
    metrics = {"rows_in": float(len(rows_in)), "rows": float(len(rows)), "removed": float(len(funnel.removals))}
    metrics.update({f"removed_{reason}": float(count) for reason, count in funnel.removed_per_reason().items()})
    return StageResult(metrics=metrics)
