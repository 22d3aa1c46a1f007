"""The figures of a run report, each rendered to PNG bytes with matplotlib's Agg backend.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no global
figure registry, no display backend, safe to call from any thread.
"""

from __future__ import annotations

import io
from typing import Sequence

from matplotlib.figure import Figure

STATUS_COLORS = {"ran": "#2e7d32", "cached": "#0288d1", "failed": "#c62828", "skipped": "#f9a825"}
_OTHER = "#757575"
_MAX_CURVE_PANELS = 6


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def timeline_png(bars: Sequence[tuple[str, str, float, float]]) -> bytes:
    """Gantt chart: one bar per stage, ``(stage, status, start_s, end_s)`` in seconds since the flow started.

    A cached stage takes well under a second, so it is drawn as a marker as well as a bar."""
    height = 0.9 + 0.38 * len(bars)
    figure = Figure(figsize=(9, height))
    axes = figure.add_subplot()
    span = max([end for _, _, _, end in bars] + [1e-3])
    for row, (stage, status, start, end) in enumerate(bars):
        color = STATUS_COLORS.get(status, _OTHER)
        axes.barh(row, max(end - start, span * 0.002), left=start, color=color, height=0.6)
        if end - start < span * 0.01:
            axes.plot([start], [row], marker="D", color=color, markersize=5)
        axes.text(end + span * 0.01, row, f"{status} {end - start:.1f} s", va="center", fontsize=8)
    axes.set_yticks(range(len(bars)), [stage for stage, *_ in bars])
    axes.invert_yaxis()  # first stage on top
    axes.set_xlim(0, span * 1.18)
    axes.set_xlabel("seconds since the flow run started")
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def _curve_order(name: str) -> tuple[int, str]:
    for rank, prefix in enumerate(("loss", "reward", "kl")):
        if name.startswith(prefix):
            return rank, name
    return 3, name


def curves_png(stage: str, curves: dict[str, list[tuple[int, float]]]) -> bytes:
    """One panel per per-step metric of a training stage (loss, reward, KL first), against the step."""
    names = sorted(curves, key=_curve_order)[:_MAX_CURVE_PANELS]
    columns = min(3, len(names))
    rows = (len(names) + columns - 1) // columns
    figure = Figure(figsize=(3.4 * columns, 2.6 * rows))
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, values = zip(*curves[name])
        axes.plot(steps, values, marker="." if len(steps) < 40 else None, linewidth=1.2)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.ticklabel_format(axis="y", useOffset=False)  # show 10.72, not 0.002 + 1.072e1
        axes.grid(alpha=0.3)
    figure.suptitle(f"{stage}: per-step metrics", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def funnel_png(stage: str, steps: Sequence[tuple[str, int]]) -> bytes:
    """Rows left after each filter step of a data stage, ``[("input", n0), (step, kept), ...]``."""
    figure = Figure(figsize=(7, 0.8 + 0.36 * len(steps)))
    axes = figure.add_subplot()
    labels, counts = zip(*steps)
    axes.barh(range(len(counts)), counts, color="#5c6bc0")
    for row, count in enumerate(counts):
        axes.text(count, row, f" {count}", va="center", fontsize=8)
    axes.set_yticks(range(len(labels)), labels)
    axes.invert_yaxis()
    axes.set_xlim(0, max(counts + (1,)) * 1.15)
    axes.set_xlabel("rows")
    axes.set_title(f"{stage}: data funnel", fontsize=10)
    return _png(figure)


def eval_png(stages: Sequence[str], scores: Sequence[dict[str, float]], rates: Sequence[str]) -> bytes:
    """Grouped bars of the rate metrics (0..1, e.g. exact_match) per eval stage, and perplexity beside them."""
    has_perplexity = any("perplexity" in s for s in scores)
    figure = Figure(figsize=(10 if has_perplexity else 7, 3.2))
    axes = figure.add_subplot(1, 2 if has_perplexity else 1, 1)
    width = 0.8 / max(len(stages), 1)
    for index, (stage, values) in enumerate(zip(stages, scores)):
        positions = [r + (index - (len(stages) - 1) / 2) * width for r in range(len(rates))]
        axes.bar(positions, [values.get(rate, 0.0) for rate in rates], width=width, label=stage)
    axes.set_xticks(range(len(rates)), rates, fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_title("accuracy-like scores", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    if has_perplexity:
        side = figure.add_subplot(1, 2, 2)
        shown = [(stage, s["perplexity"]) for stage, s in zip(stages, scores) if "perplexity" in s]
        side.bar([stage for stage, _ in shown], [value for _, value in shown], color="#8d6e63")
        side.set_yscale("log")
        side.set_title("perplexity (lower is better)", fontsize=10)
        side.tick_params(axis="x", labelsize=8)
        side.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _png(figure)
