"""Preference pairs and unpaired feedback: read, validated, and kept through a dataset artifact."""

import json

import pytest

from tunegraph.chat_data import read_conversations, read_rows, write_rows
from tunegraph.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_pairs_round_trip_through_an_artifact(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"},
    ])
    rows = read_conversations(src)
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "Paris"} and rows[0]["rejected"] == "Lyon"
    assert rows[1]["messages"][0]["role"] == "system" and rows[1]["rejected"] == "5"
    (tmp_path / "artifact").mkdir()
    write_rows(rows, tmp_path / "artifact" / "data.jsonl")
    assert read_rows(tmp_path / "artifact") == rows


def test_unpaired_feedback_keeps_boolean_labels(tmp_path):
    src = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Say hi", "completion": "hi", "label": True},
        {"prompt": "Say hi", "completion": "go away", "label": False},
    ])
    rows = read_conversations(src)
    assert [r["label"] for r in rows] == [True, False]
    assert rows[0]["id"] != rows[1]["id"]


@pytest.mark.parametrize("row,field", [
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
    ({"chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "label"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "x", "rejected": "y"}, row]) \
        if "chosen" in row or "rejected" in row or "completion" not in row else \
        write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "x", "label": True}, row])
    with pytest.raises(DataError) as caught:
        read_conversations(src)
    message = str(caught.value)
    assert message.startswith(f"{src}:2: field '{field}'") and "\n" not in message
