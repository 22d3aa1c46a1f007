"""Input formats beyond chat/alpaca/preference/unpaired: ShareGPT, prompt/completion, verifiable tasks;
JSON-list and Parquet files; errors that name the file, the line or row, and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunegraph.chat_data import FORMATS, prompt_and_reference, read_conversations, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.errors import DataError
from tunegraph.rewards.base import reference_answer
from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def error_of(path: Path, **kwargs) -> str:
    """The one-line DataError message from reading ``path``; it names the file."""
    with pytest.raises(DataError) as info:
        read_conversations(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


SHAREGPT = {"id": "s1", "conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
    {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}]}


# --------------------------------------------------------------------------- new row formats


def test_sharegpt_maps_speakers_to_roles(tmp_path):
    rows = read_conversations(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT]))
    assert rows == [{"id": "s1", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"}]}]


def test_sharegpt_errors_use_its_own_field_names(tmp_path):
    wrong_order = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]}
    message = error_of(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, wrong_order]))
    assert ":2: field 'conversations[0].from': expected 'human'" in message and "human/gpt" in message
    unknown = {"conversations": [{"from": "bot", "value": "hi"}]}
    message = error_of(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, unknown]))
    assert ":2: field 'conversations[0].from': expected one of human, gpt, system, got 'bot'" in message
    missing = {"conversations": [{"from": "human"}]}
    assert ":2: field 'conversations[0].value': missing" in error_of(write_jsonl(tmp_path / "s.jsonl",
                                                                               [SHAREGPT, missing]))


def test_prompt_completion_without_label_is_sft_data(tmp_path):
    rows = read_conversations(write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Say hi", "completion": "hi"},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say bye"}],
         "completion": [{"role": "assistant", "content": "bye"}]},
    ]))
    assert rows[0]["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert rows[1]["messages"][0]["role"] == "system" and rows[1]["messages"][-1]["content"] == "bye"
    assert "label" not in rows[0]


def test_a_label_still_makes_unpaired_feedback(tmp_path):
    rows = read_conversations(write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": False}]))
    assert rows[0]["label"] is False


def test_verifiable_tasks_keep_the_answer_for_rewards_and_evaluation(tmp_path):
    rows = read_conversations(write_jsonl(tmp_path / "math.jsonl", [
        {"prompt": "What is 6*7?", "answer": 42}, {"prompt": "Half of 1?", "answer": 0.5},
        {"prompt": "Capital of Peru?", "answer": "Lima"}]))
    assert [r["answer"] for r in rows] == ["42", "0.5", "Lima"]
    prompt, reference = prompt_and_reference(rows[0])
    assert prompt == [{"role": "user", "content": "What is 6*7?"}] and reference == "42"
    assert reference_answer(rows[2]) == "Lima"
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    write_rows(rows, artifact / "data.jsonl")
    assert read_rows(artifact) == rows


@pytest.mark.parametrize("answer, words", [(True, "expected a string or a number, got a boolean"),
                                           ("  ", "is empty"), (None, "expected a string or a number, got null")])
def test_verifiable_answer_must_be_text_or_number(tmp_path, answer, words):
    message = error_of(write_jsonl(tmp_path / "v.jsonl", [{"prompt": "q", "answer": "1"},
                                                          {"prompt": "q2", "answer": answer}]))
    assert ":2: field 'answer':" in message and words in message


@pytest.mark.parametrize("record, expected", [
    (SHAREGPT, "sharegpt"), ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"prompt": "p", "completion": "c", "label": True}, "unpaired"), ({"prompt": "p", "answer": "a"}, "verifiable"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
])
def test_auto_detects_the_new_formats(tmp_path, record, expected):
    auto = read_conversations(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert auto == read_conversations(tmp_path / "a.jsonl", format=expected)
    assert expected in FORMATS


def test_internal_rows_keep_a_numeric_score(tmp_path):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "score": 4.5, "messages": messages}])
    assert read_rows(tmp_path)[0]["score"] == 4.5
    write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "score": "high", "messages": messages}])
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'score': expected a number"):
        read_rows(tmp_path)


# --------------------------------------------------------------------------- JSON lists


def test_json_list_reads_like_jsonl(tmp_path):
    records = [SHAREGPT, {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    assert read_conversations(write_json(tmp_path / "a.json", records)) == \
        read_conversations(write_jsonl(tmp_path / "a.jsonl", records))


def test_json_errors_name_the_line_and_the_row_index(tmp_path):
    good = {"instruction": "a", "output": "b"}
    path = write_json(tmp_path / "a.json", [good, good | {"output": "c"}, {"instruction": "q", "output": 3}])
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"output": 3' in text) - 2
    message = error_of(path)
    assert f"a.json:{line}: row[2]: field 'output': expected a string, got a number 3" in message


def test_json_duplicate_ids_name_both_rows(tmp_path):
    chat = {"id": "x", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    message = error_of(write_json(tmp_path / "d.json", [chat, chat]))
    assert "row[1]: field 'id': duplicate id 'x' (also on row[0])" in message


@pytest.mark.parametrize("text, words", [
    ("", "file is empty"), ("[]", "file has no rows; expected a JSON list of objects"),
    ('{"messages": []}', "expected a JSON list of objects"), ("[1]", "row[0]: is a number, expected a JSON object"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": }]', ":2: not valid JSON"),
    ('[{"instruction": "a", "output": "b"}', "not closed"),
])
def test_malformed_json_files(tmp_path, text, words):
    (tmp_path / "m.json").write_text(text, encoding="utf-8")
    assert words in error_of(tmp_path / "m.json")


def test_json_non_utf8_names_the_line(tmp_path):
    (tmp_path / "bad.json").write_bytes(b'[\n{"instruction": "caf\xe9", "output": "x"}]')
    assert ":2: not UTF-8 at byte" in error_of(tmp_path / "bad.json")


# --------------------------------------------------------------------------- Parquet


def test_parquet_rows_with_nested_messages_and_missing_fields(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [
        {"instruction": "Up.", "input": "abc", "output": "ABC"},
        {"instruction": "Say hi.", "input": None, "output": "hi"},  # a null cell is an absent field
    ])
    rows = read_conversations(path)
    assert rows[0]["messages"][0]["content"] == "Up.\n\nabc" and rows[1]["messages"][0]["content"] == "Say hi."
    chat = write_parquet(tmp_path / "c.parquet", [{"id": "c", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    assert read_conversations(chat) == [{"id": "c", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]


def test_parquet_errors_name_the_row_index(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]},
    ])
    message = error_of(path)
    assert message.startswith(f"{path}: row[1]: field 'messages[1].role': expected 'assistant'")


def test_parquet_duplicates_and_bad_files(tmp_path):
    record = {"id": "same", "prompt": "p", "answer": "1"}
    assert "row[1]: field 'id': duplicate id 'same' (also on row[0])" in error_of(
        write_parquet(tmp_path / "d.parquet", [record, record]))
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert "file is empty" in error_of(tmp_path / "empty.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet", encoding="utf-8")
    assert "not a readable Parquet file" in error_of(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "none.parquet")
    assert "file has no rows" in error_of(tmp_path / "none.parquet")


def test_load_dataset_reads_parquet_into_the_same_artifact_as_jsonl(tmp_path):
    records = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    write_parquet(tmp_path / "t.parquet", records)
    write_jsonl(tmp_path / "t.jsonl", records)
    ctx = StageContext(stage="d", seed=0, threads=1, workspace=tmp_path)
    for name in ("t.parquet", "t.jsonl"):
        (tmp_path / f"out-{name}").mkdir()
        load_dataset(LoadDatasetParams(path=name, format="verifiable"), {}, tmp_path / f"out-{name}", ctx)
    from_parquet, from_jsonl = (tmp_path / f"out-{name}" / "data.jsonl" for name in ("t.parquet", "t.jsonl"))
    assert from_parquet.read_bytes() == from_jsonl.read_bytes()
