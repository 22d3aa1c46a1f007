"""Stage kind ``load_dataset``: read a JSONL, JSON or Parquet file (chat, ShareGPT, alpaca, prompt/completion,
preference pairs, unpaired feedback, verifiable tasks), validate it, write the internal format."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunegraph.chat_data import Row, assistant_messages, dataset_file, read_conversations, write_rows
from tunegraph.context import StageContext
from tunegraph.params import InputFile, StageParams
from tunegraph.registry import StageResult, stage


class LoadDatasetParams(StageParams):
    path: InputFile = Field(description=".jsonl, .json (a list) or .parquet file, relative to the workspace")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference", "unpaired",
                    "verifiable"] = Field(
        "auto", description="input format; auto detects it from the first row's keys"
    )
    limit: int | None = Field(None, ge=1, description="keep the first N rows (after shuffling, if shuffle)")
    shuffle: bool = Field(False, description="shuffle rows with the run's seed")


def dataset_metrics(rows: list[Row]) -> dict[str, float]:
    """Row count, mean assistant turns per row, mean characters per assistant message."""
    replies = [text for row in rows for text in assistant_messages(row)]
    return {
        "rows": float(len(rows)),
        "mean_turns": round(len(replies) / max(len(rows), 1), 4),
        "mean_assistant_chars": round(sum(len(t) for t in replies) / max(len(replies), 1), 4),
    }


def select_rows(rows: list[Row], limit: int | None, shuffle: bool, seed: int) -> list[Row]:
    """Shuffle (seeded) if asked, then keep the first ``limit`` rows."""
    chosen = list(rows)
    if shuffle:
        random.Random(seed).shuffle(chosen)
    return chosen[:limit] if limit is not None else chosen


@stage("load_dataset", params=LoadDatasetParams, produces="dataset", summary_metrics=("rows",))
def load_dataset(params: LoadDatasetParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Validate ``params.path`` and write it, normalized, to ``out/data.jsonl``."""
    rows = read_conversations(ctx.path(params.path), format=params.format, name=params.path)
    selected = select_rows(rows, params.limit, params.shuffle, ctx.seed)
    write_rows(selected, dataset_file(out))
    ctx.info(f"{params.path}: {len(rows)} rows read, {len(selected)} written")
    return StageResult(metrics=dataset_metrics(selected))
