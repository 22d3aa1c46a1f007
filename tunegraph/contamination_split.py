"""Contamination-aware evaluation: which eval items a decontaminate stage found in the training data.

A ``decontaminate`` stage (:mod:`tunegraph.tasks.decontaminate`) records every training row that
overlaps an eval item in ``contamination.jsonl`` (``id`` of the training row, ``reason``, ``eval_set``,
``eval_id``, ``score``, ``detail``), and the eval sets it checked in its data card. An evaluate stage
given that artifact reports its metrics on all items and again on the *clean* items (those no
training row was flagged against), the split of GPT-3's contamination study (Brown et al. 2020,
https://arxiv.org/abs/2005.14165, appendix C): a model that does much better on the flagged items
than on the clean ones has likely seen them.

Eval items are matched by eval set (the evaluated dataset's stage name, as decontaminate names its
``eval`` inputs) and item id.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunegraph.data.data_card import CARD_JSON
from tunegraph.tasks.decontaminate import REPORT_FILE

FLAGGED_FILE = "contaminated_items.jsonl"


class NotDecontaminated(ValueError):
    """The artifact is not a decontaminate stage's, or did not check the evaluated eval set."""


def checked_eval_sets(artifact: Path) -> list[str]:
    """The eval sets a decontaminate artifact was checked against (from its data card)."""
    card, report = artifact / CARD_JSON, artifact / REPORT_FILE
    if not report.is_file() or not card.is_file():
        raise NotDecontaminated(f"input 'contamination' ({artifact.name!r}) is not a decontaminate stage's output "
                                f"(it has no {REPORT_FILE}); "
                                f"connect input 'contamination' to a decontaminate stage")
    settings = json.loads(card.read_text(encoding="utf-8")).get("settings", {})
    return [str(name) for name in settings.get("eval_sets", [])]


def flagged_items(artifact: Path, eval_set: str) -> dict[str, list[dict]]:
    """Eval item id -> the training rows flagged against it (``train_id``, ``reason``, ``score``, ``detail``)."""
    checked = checked_eval_sets(artifact)
    if eval_set not in checked:
        raise NotDecontaminated(f"the decontaminate stage {artifact.name!r} checked eval set(s) "
                                f"{', '.join(map(repr, checked)) or 'none'}, not {eval_set!r}; "
                                f"add {eval_set!r} to its eval input")
    flagged: dict[str, list[dict]] = {}
    for line in (artifact / REPORT_FILE).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        leak = json.loads(line)
        if leak["eval_set"] == eval_set:
            flagged.setdefault(str(leak["eval_id"]), []).append(
                {"train_id": leak["id"], "reason": leak["reason"], "score": leak["score"], "detail": leak["detail"]})
    return flagged


def write_flagged(flagged: dict[str, list[dict]], predictions: list[dict], path: Path) -> None:
    """One JSON line per evaluated item that was flagged: its prediction and the training rows that match it."""
    with open(path, "w", encoding="utf-8") as handle:
        for prediction in predictions:
            if prediction["id"] in flagged:
                line = {**prediction, "matches": flagged[prediction["id"]]}
                handle.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
