"""The table printed at the end of a run, and where to look next."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunegraph.recipe import Recipe


def _format_metric(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(recipe: Recipe, results: list[dict], workspace: Path, tracking_uri: str, wall_s: float,
                  console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"tunegraph · {recipe.name} · {wall_s:.1f} s")
    for column in ("stage", "kind", "status", "duration", "key metrics"):
        table.add_column(column)
    for row in results:
        kind = recipe.stages[row["stage"]].kind
        metrics = row.get("metrics") or {}
        shown = [k for k in kind.summary_metrics if k in metrics] or list(metrics)[:3]
        key_metrics = "  ".join(f"{k}={_format_metric(metrics[k])}" for k in shown)
        status = row["status"]
        style = {"ran": "green", "cached": "cyan", "failed": "red", "skipped": "yellow"}.get(status, "")
        table.add_row(row["stage"], kind.name, f"[{style}]{status}[/{style}]", f"{row.get('duration_s', 0):.1f} s",
                      key_metrics or row.get("error", "")[:80])
    console.print(table)
    root = recipe.output_root(workspace)
    console.print(f"artifacts:  {root.relative_to(workspace) if root.is_relative_to(workspace) else root}/<stage>/"
                  f"  (manifest.json in each holds the lineage)")
    console.print(f"metrics:    mlflow ui --backend-store-uri {tracking_uri}")
    console.print("reproduce:  tunegraph dvc " + str(recipe.path) + " && dvc repro   ·   dvc status")
