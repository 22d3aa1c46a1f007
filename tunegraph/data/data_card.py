"""The data card of a dataset artifact: the funnel of counts, removals per reason, length and score histograms.

Written into the artifact as ``data_card.json`` (for machines), ``data_card.md`` (for people) and
PNG plots: ``length_histogram.png`` (prompt and reply words, input vs kept rows) and, when rows carry
a numeric ``score`` (an LLM judge's), ``score_histogram.png``. Everything is a function of the rows,
so the card is as reproducible as the data: no timestamps, and PNGs without a Software tag.
:func:`data_card_files` lists the files, for the tracker to log as MLflow artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tunegraph.data.removals import Funnel
from tunegraph.data.text import prompt_text, reply_text, words

CARD_JSON = "data_card.json"
CARD_MARKDOWN = "data_card.md"
LENGTH_PLOT = "length_histogram.png"
SCORE_PLOT = "score_histogram.png"
CARD_FILES = (CARD_MARKDOWN, CARD_JSON, LENGTH_PLOT, SCORE_PLOT)
EXAMPLES_PER_REASON = 3
_BINS = 30


@dataclass(frozen=True)
class CardInputs:
    """What a card describes: the stage's name, its funnel, its rows before and after, and settings to show."""

    title: str
    funnel: Funnel
    rows_in: Sequence[dict]
    rows_out: Sequence[dict]
    settings: dict = field(default_factory=dict)


def _summary(values: Sequence[float]) -> dict:
    if not len(values):
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"count": int(len(array)), "mean": round(float(array.mean()), 4), "min": float(array.min()),
            "median": float(np.median(array)), "max": float(array.max())}


def _lengths(rows: Sequence[dict]) -> dict[str, list[int]]:
    return {"prompt_words": [len(words(prompt_text(r))) for r in rows],
            "reply_words": [len(words(reply_text(r))) for r in rows]}


def _scores(rows: Sequence[dict]) -> list[float]:
    return [float(r["score"]) for r in rows if isinstance(r.get("score"), (int, float))
            and not isinstance(r.get("score"), bool)]


def card_dict(card: CardInputs) -> dict:
    """The card's content as JSON-able data."""
    examples: dict[str, list[dict]] = {}
    for removal in card.funnel.removals:
        bucket = examples.setdefault(removal.reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            bucket.append({"id": removal.id, "detail": removal.detail})
    lengths_in, lengths_out = _lengths(card.rows_in), _lengths(card.rows_out)
    content = {
        "title": card.title,
        "funnel": card.funnel.as_dict(),
        "removed_examples": dict(sorted(examples.items())),
        "lengths": {name: {"input": _summary(lengths_in[name]), "kept": _summary(lengths_out[name])}
                    for name in lengths_in},
        "settings": card.settings,
        "plots": [LENGTH_PLOT],
    }
    scores_in, scores_out = _scores(card.rows_in), _scores(card.rows_out)
    if scores_in:
        content["scores"] = {"input": _summary(scores_in), "kept": _summary(scores_out)}
        content["plots"].append(SCORE_PLOT)
    return content


def write_data_card(out: Path, card: CardInputs) -> dict:
    """Write the card's JSON, Markdown and plots into ``out``; returns the JSON content."""
    content = card_dict(card)
    (out / CARD_JSON).write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    (out / CARD_MARKDOWN).write_text(card_markdown(content), encoding="utf-8")
    lengths_in, lengths_out = _lengths(card.rows_in), _lengths(card.rows_out)
    _plot_histograms(out / LENGTH_PLOT, f"{card.title}: lengths (words)",
                     [(name.replace("_", " "), lengths_in[name], lengths_out[name]) for name in lengths_in])
    if SCORE_PLOT in content["plots"]:
        _plot_histograms(out / SCORE_PLOT, f"{card.title}: judge scores",
                         [("score", _scores(card.rows_in), _scores(card.rows_out))])
    return content


def card_markdown(content: dict) -> str:
    """The card as Markdown: funnel table, removals per reason with examples, length/score summaries."""
    funnel = content["funnel"]
    lines = [f"# Data card: {content['title']}", "", f"{funnel['rows_in']} rows in, {funnel['rows_out']} rows out.",
             "", "## Funnel", "", "| step | rows kept | removed |", "|---|---:|---:|",
             f"| input | {funnel['rows_in']} | |"]
    previous = funnel["rows_in"]
    for step in funnel["steps"]:
        lines.append(f"| {step['step']} | {step['kept']} | {previous - step['kept']} |")
        previous = step["kept"]
    lines += ["", "## Removed, per reason", ""]
    if not funnel["removed_per_reason"]:
        lines.append("Nothing was removed.")
    for reason, count in funnel["removed_per_reason"].items():
        lines.append(f"- **{reason}**: {count}")
        lines += [f"  - `{e['id']}`: {e['detail']}" for e in content["removed_examples"].get(reason, [])]
    lines += ["", "## Lengths (words)", "", "| text | rows | mean | median | max |", "|---|---|---:|---:|---:|"]
    for name, sides in content["lengths"].items():
        for side, summary in sides.items():
            if summary["count"]:
                lines.append(f"| {name} ({side}) | {summary['count']} | {summary['mean']} | {summary['median']} | "
                             f"{summary['max']} |")
    if "scores" in content:
        lines += ["", "## Judge scores", "", "| rows | count | mean | min | max |", "|---|---:|---:|---:|---:|"]
        for side, summary in content["scores"].items():
            if summary["count"]:
                lines.append(f"| {side} | {summary['count']} | {summary['mean']} | {summary['min']} | "
                             f"{summary['max']} |")
    if content["settings"]:
        lines += ["", "## Settings", "", "```json", json.dumps(content["settings"], indent=2, sort_keys=True), "```"]
    lines += ["", *[f"![{plot}]({plot})" for plot in content["plots"]], ""]
    return "\n".join(lines)


def _plot_histograms(path: Path, title: str, panels: list[tuple[str, Sequence[float], Sequence[float]]]) -> None:
    """One panel per (label, input values, kept values): two overlaid histograms on shared bins."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also the only backend whose PNG bytes we rely on
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), dpi=100, squeeze=False)
    for axis, (label, values_in, values_out) in zip(axes[0], panels):
        bins = _bins(np.asarray(list(values_in) + list(values_out), dtype=np.float64))
        axis.hist(values_in, bins=bins, alpha=0.5, label=f"input ({len(values_in)})")
        axis.hist(values_out, bins=bins, alpha=0.7, label=f"kept ({len(values_out)})")
        axis.set_xlabel(label)
        axis.set_ylabel("rows")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)


def _bins(values: np.ndarray) -> np.ndarray | int:
    """One bin per integer when the values are few integers (word counts), else ``_BINS`` equal bins."""
    if not len(values):
        return _BINS
    low, high = values.min(), values.max()
    if np.all(values == np.round(values)) and high - low < _BINS:
        return np.arange(low, high + 2) - 0.5
    return np.histogram_bin_edges(values, bins=_BINS)


def data_card_files(artifact_dir: Path) -> list[Path]:
    """The data card files present in a dataset artifact (what to log to MLflow as artifacts)."""
    return [Path(artifact_dir) / name for name in CARD_FILES if (Path(artifact_dir) / name).is_file()]
