"""What a filter removed and why (one :class:`Removal` per row), and the funnel of counts through the filters."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

REMOVED_FILE = "removed.jsonl"


@dataclass(frozen=True)
class Removal:
    """Row ``id`` was removed for ``reason`` (a rule's name); ``detail`` says what was seen."""

    id: str
    reason: str
    detail: str = ""


@dataclass
class Funnel:
    """Row counts through a sequence of filter steps: ``steps`` is ``[(step, rows kept after it)]``."""

    rows_in: int
    steps: list[tuple[str, int]] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)

    def record(self, step: str, kept: int, removed: Iterable[Removal]) -> None:
        self.steps.append((step, kept))
        self.removals.extend(removed)

    @property
    def rows_out(self) -> int:
        return self.steps[-1][1] if self.steps else self.rows_in

    def removed_per_reason(self) -> dict[str, int]:
        counts = Counter(r.reason for r in self.removals)
        return dict(sorted(counts.items()))

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out,
                "steps": [{"step": step, "kept": kept} for step, kept in self.steps],
                "removed_per_reason": self.removed_per_reason()}


def keep_rows(rows: list[dict], removals: Iterable[Removal]) -> list[dict]:
    """``rows`` without the removed ones, in their order."""
    gone = {r.id for r in removals}
    return [row for row in rows if row["id"] not in gone]


def write_removals(removals: Iterable[Removal], path: Path) -> int:
    """One JSON object per removal (id, reason, detail), in the order the filters removed them."""
    lines = [json.dumps(asdict(r), sort_keys=True, ensure_ascii=False) + "\n" for r in removals]
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)
