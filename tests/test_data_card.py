"""The data card: funnel counts, removals per reason with examples, length/score histograms as PNGs, reproducible."""

from __future__ import annotations

import json

from tunegraph.data.data_card import CardInputs, data_card_files, write_data_card
from tunegraph.data.removals import Funnel, Removal, keep_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(row_id: str, prompt_words: int, reply_words: int, score: float | None = None) -> dict:
    data = {"id": row_id, "messages": [{"role": "user", "content": " ".join(["ask"] * prompt_words)},
                                       {"role": "assistant", "content": " ".join(["say"] * reply_words)}]}
    return data if score is None else data | {"score": score}


def funnel_over(rows: list[dict]) -> tuple[Funnel, list[dict]]:
    """Two steps: r1 and r2 removed as too short, then r3, r4 and r5 as duplicates."""
    funnel = Funnel(rows_in=len(rows))
    kept = rows
    for step, removed in (("heuristics", [Removal("r1", "reply_too_short", "1 chars < 5"),
                                          Removal("r2", "reply_too_short", "2 chars < 5")]),
                          ("dedup", [Removal(f"r{i}", "near_duplicate", f"near-duplicate of r{i + 3}")
                                     for i in (3, 4, 5)])):
        kept = keep_rows(kept, removed)
        funnel.record(step, len(kept), removed)
    return funnel, kept


def test_card_counts_the_funnel_and_the_reasons(tmp_path):
    rows = [row(f"r{i}", 5 + i, 10 + 2 * i) for i in range(10)]
    funnel, kept = funnel_over(rows)
    content = write_data_card(tmp_path, CardInputs("filter_sft", funnel, rows, kept, {"threshold": 0.8}))
    assert content["funnel"] == {"rows_in": 10, "rows_out": 5,
                                 "steps": [{"step": "heuristics", "kept": 8}, {"step": "dedup", "kept": 5}],
                                 "removed_per_reason": {"near_duplicate": 3, "reply_too_short": 2}}
    assert [e["id"] for e in content["removed_examples"]["near_duplicate"]] == ["r3", "r4", "r5"]
    replies = content["lengths"]["reply_words"]
    assert replies["input"]["max"] == 28 and replies["kept"]["count"] == 5
    assert json.loads((tmp_path / "data_card.json").read_text()) == content
    markdown = (tmp_path / "data_card.md").read_text()
    assert "| heuristics | 8 | 2 |" in markdown and "| dedup | 5 | 3 |" in markdown
    assert "**near_duplicate**: 3" in markdown and "`r3`: near-duplicate of r6" in markdown
    assert "score_histogram.png" not in content["plots"] and not (tmp_path / "score_histogram.png").exists()
    assert (tmp_path / "length_histogram.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in data_card_files(tmp_path)] == ["data_card.md", "data_card.json", "length_histogram.png"]


def test_scores_give_a_score_histogram(tmp_path):
    rows = [row(f"r{i}", 4, 6, score=float(i % 5) + 1) for i in range(10)]
    funnel, kept = funnel_over(rows)
    content = write_data_card(tmp_path, CardInputs("judged", funnel, rows, kept))
    assert content["scores"]["input"]["count"] == 10 and content["scores"]["kept"]["count"] == 5
    assert content["scores"]["input"]["max"] == 5.0
    assert (tmp_path / "score_histogram.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "## Judge scores" in (tmp_path / "data_card.md").read_text()


def test_card_files_are_byte_identical_across_runs(tmp_path):
    rows = [row(f"r{i}", 3 + i % 7, 20 + i, score=i / 10) for i in range(40)]
    funnel, kept = funnel_over(rows)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_data_card(tmp_path / name, CardInputs("same", funnel, rows, kept))
    first = {p.name: p.read_bytes() for p in data_card_files(tmp_path / "a")}
    assert len(first) == 4 and first == {p.name: p.read_bytes() for p in data_card_files(tmp_path / "b")}


def test_nothing_removed_and_empty_output_are_described(tmp_path):
    rows = [row("only", 3, 3)]
    funnel = Funnel(rows_in=1)
    funnel.record("heuristics", 1, [])
    content = write_data_card(tmp_path, CardInputs("noop", funnel, rows, rows))
    assert content["funnel"]["removed_per_reason"] == {}
    assert "Nothing was removed." in (tmp_path / "data_card.md").read_text()
    funnel.record("dedup", 0, [Removal("only", "exact_duplicate")])
    (tmp_path / "empty").mkdir()
    content = write_data_card(tmp_path / "empty", CardInputs("all-gone", funnel, rows, []))
    assert content["lengths"]["prompt_words"]["kept"] == {"count": 0} and content["funnel"]["rows_out"] == 0
