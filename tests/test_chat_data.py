"""Conversation data: formats, validation messages, ids, the load_dataset stage, shipped quickstart data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegraph.chat_data import (
    DATA_FILE,
    derived_id,
    prompt_and_reference,
    read_conversations,
    read_rows,
    write_rows,
)
from tunegraph.context import StageContext
from tunegraph.errors import DataError
from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset

QUICKSTART = Path(__file__).resolve().parents[1] / "data" / "quickstart"


def chat_line(*pairs: tuple[str, str], **extra) -> str:
    """A chat-format JSONL line from (role, content) pairs."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs], **extra})


GOOD = chat_line(("user", "hi"), ("assistant", "hello"))


def write(tmp_path: Path, *lines: str, name: str = "x.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def data_error(path: Path, **kwargs) -> str:
    """The DataError message from reading ``path``; asserts it is a single line naming the file."""
    with pytest.raises(DataError) as info:
        read_conversations(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


# --------------------------------------------------------------------------- formats


def test_chat_format_keeps_messages_and_ids(tmp_path):
    path = write(tmp_path, chat_line(("system", "be brief"), ("user", "2+2?"), ("assistant", "4"), id="a1"))
    rows = read_conversations(path, format="chat")
    assert rows == [{"id": "a1", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}]


def test_alpaca_format_joins_instruction_and_input(tmp_path):
    path = write(
        tmp_path,
        json.dumps({"instruction": "Uppercase this.", "input": "abc", "output": "ABC", "id": "u"}),
        json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}),
        json.dumps({"instruction": "Say bye.", "output": "bye"}),
    )
    rows = read_conversations(path, format="alpaca")
    assert rows[0] == {"id": "u", "messages": [
        {"role": "user", "content": "Uppercase this.\n\nabc"},
        {"role": "assistant", "content": "ABC"},
    ]}
    assert rows[1]["messages"][0]["content"] == "Say hi."
    assert rows[2]["messages"] == [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "bye"}]


def test_auto_detects_each_format(tmp_path):
    chat = write(tmp_path, "", GOOD, name="chat.jsonl")
    alpaca = write(tmp_path, json.dumps({"instruction": "hi", "output": "hello"}), name="alpaca.jsonl")
    assert read_conversations(chat) == read_conversations(alpaca)


def test_auto_rejects_unknown_keys(tmp_path):
    message = data_error(write(tmp_path, json.dumps({"question": "a", "reply": "b"})))
    assert ":1:" in message and "'question', 'reply'" in message and "format" in message


def test_explicit_format_mismatch_names_missing_field(tmp_path):
    message = data_error(write(tmp_path, GOOD), format="alpaca")
    assert ":1: field 'instruction': missing" in message


def test_blank_lines_are_skipped_and_line_numbers_count_them(tmp_path):
    path = write(tmp_path, "", GOOD, "   ", chat_line(("user", "x"), ("assistant", "")))
    message = data_error(path)
    assert ":4: field 'messages[1].content'" in message


# --------------------------------------------------------------------------- validation errors


def test_invalid_json_line(tmp_path):
    message = data_error(write(tmp_path, GOOD, '{"messages": [}'))
    assert ":2: line is not valid JSON: Expecting value" in message


def test_line_not_an_object(tmp_path):
    message = data_error(write(tmp_path, GOOD, "[1, 2]"))
    assert ":2: line is a list, expected a JSON object" in message


def test_missing_field(tmp_path):
    message = data_error(write(tmp_path, GOOD, json.dumps({"messages": [{"role": "user"}]})))
    assert ":2: field 'messages[0].content': missing" in message


def test_missing_messages(tmp_path):
    message = data_error(write(tmp_path, GOOD, json.dumps({"id": "q"})), format="chat")
    assert ":2: field 'messages': missing" in message


def test_wrong_type(tmp_path):
    line = json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]})
    message = data_error(write(tmp_path, GOOD, line))
    assert ":2: field 'messages[0].content': expected a string, got a number 5" in message


def test_wrong_type_of_id(tmp_path):
    message = data_error(write(tmp_path, chat_line(("user", "a"), ("assistant", "b"), id=7)))
    assert ":1: field 'id': expected a string" in message


def test_empty_final_assistant_message(tmp_path):
    message = data_error(write(tmp_path, chat_line(("user", "a"), ("assistant", "  "))))
    assert ":1: field 'messages[1].content': the final assistant message is empty" in message


def test_empty_alpaca_output(tmp_path):
    message = data_error(write(tmp_path, json.dumps({"instruction": "a", "output": ""})))
    assert ":1: field 'output': is empty" in message


def test_unknown_role(tmp_path):
    line = chat_line(("user", "a"), ("assistant", "b"), ("bot", "c"))
    message = data_error(write(tmp_path, GOOD, line, name="x.jsonl"))
    assert message == (
        f"{tmp_path / 'x.jsonl'}:2: field 'messages[2].role': expected one of system, user, assistant, got 'bot'"
    )


@pytest.mark.parametrize(
    "pairs, field, words",
    [
        ((("assistant", "a"), ("user", "b")), "messages[0].role", "expected 'user'"),
        ((("user", "a"), ("user", "b"), ("assistant", "c")), "messages[1].role", "expected 'assistant'"),
        ((("user", "a"), ("assistant", "b"), ("system", "c")), "messages[2].role", "only allowed first"),
        ((("user", "a"), ("assistant", "b"), ("user", "c")), "messages[2].role", "last message"),
        ((("system", "s"),), "messages", "no user/assistant turns"),
        ((), "messages", "no user/assistant turns"),
    ],
)
def test_role_order(tmp_path, pairs, field, words):
    message = data_error(write(tmp_path, chat_line(*pairs)))
    assert f":1: field {field!r}:" in message and words in message


def test_duplicate_explicit_ids_name_both_lines(tmp_path):
    path = write(tmp_path, chat_line(("user", "a"), ("assistant", "b"), id="same"), GOOD,
                 chat_line(("user", "c"), ("assistant", "d"), id="same"))
    message = data_error(path)
    assert ":3: field 'id': duplicate id 'same' (also on line 1)" in message and "remove the duplicate" in message


def test_exact_duplicate_rows_without_ids_name_both_lines(tmp_path):
    message = data_error(write(tmp_path, GOOD, "", GOOD))
    assert ":3: field 'messages': row repeats line 1" in message and "remove the duplicate" in message


def test_empty_file(tmp_path):
    message = data_error(write(tmp_path, "", "  "))
    assert message == f"{tmp_path / 'x.jsonl'}: file has no rows; expected one JSON object per line"


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    message = data_error(path)
    offset = len(GOOD) + 1 + len(b'{"messages": "caf')
    assert f":2: not UTF-8 at byte {offset}: re-encode the file as UTF-8" in message


def test_file_not_found(tmp_path):
    message = data_error(tmp_path / "missing.jsonl")
    assert "file not found" in message


def test_errors_use_the_name_given(tmp_path):
    path = write(tmp_path, "nope")
    with pytest.raises(DataError, match=r"^data/x\.jsonl:1: line is not valid JSON"):
        read_conversations(path, name="data/x.jsonl")


# --------------------------------------------------------------------------- ids and the internal format


def test_derived_ids_are_deterministic_and_content_based(tmp_path):
    first = read_conversations(write(tmp_path, GOOD, name="a.jsonl"))[0]["id"]
    again = read_conversations(write(tmp_path, "", GOOD, name="b.jsonl"))[0]["id"]
    other = read_conversations(write(tmp_path, chat_line(("user", "hi"), ("assistant", "hey")), name="c.jsonl"))
    assert first == again == derived_id([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert len(first) == 16 and int(first, 16) >= 0
    assert other[0]["id"] != first


def test_write_and_read_rows_round_trip(tmp_path):
    rows = read_conversations(write(tmp_path, chat_line(("user", "héllo ☃"), ("assistant", "ok"), id="z")))
    write_rows(rows, tmp_path / DATA_FILE)
    text = (tmp_path / DATA_FILE).read_bytes().decode("utf-8")
    assert text == '{"id": "z", "messages": [{"content": "héllo ☃", "role": "user"}, {"content": "ok", "role": "assistant"}]}\n'
    assert read_rows(tmp_path) == rows


def test_prompt_and_reference():
    row = {"id": "r", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
    ]}
    prompt, reference = prompt_and_reference(row)
    assert prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert reference == "a"
    assert len(row["messages"]) == 3


# --------------------------------------------------------------------------- the load_dataset stage


def run_stage(tmp_path: Path, out_name: str, **params) -> tuple[Path, dict]:
    out = tmp_path / out_name
    out.mkdir()
    ctx = StageContext(stage="d", seed=0, threads=1, workspace=tmp_path)
    result = load_dataset(LoadDatasetParams(**params), {}, out, ctx)
    return out / DATA_FILE, result.metrics


def numbered_rows(tmp_path: Path, count: int) -> None:
    lines = [json.dumps({"instruction": f"q{i}", "output": f"answer {i}"}) for i in range(count)]
    write(tmp_path, *lines, name="in.jsonl")


def test_load_dataset_writes_normalized_rows_byte_identically(tmp_path):
    write(tmp_path, json.dumps({"output": "ABC", "instruction": "Up.", "input": "abc"}),
          json.dumps({"id": "t", "instruction": "a", "output": "bbbbb"}), name="in.jsonl")
    first, metrics = run_stage(tmp_path, "out1", path="in.jsonl")
    second, _ = run_stage(tmp_path, "out2", path="in.jsonl")
    assert first.read_bytes() == second.read_bytes()
    rows = read_rows(first.parent)
    assert [r["id"] for r in rows][1] == "t"
    assert rows[0]["messages"][0]["content"] == "Up.\n\nabc"
    assert first.read_text(encoding="utf-8").splitlines()[1] == (
        '{"id": "t", "messages": [{"content": "a", "role": "user"}, {"content": "bbbbb", "role": "assistant"}]}'
    )
    assert metrics == {"rows": 2.0, "mean_turns": 1.0, "mean_assistant_chars": 4.0}


def test_load_dataset_metrics_count_turns(tmp_path):
    write(tmp_path, chat_line(("user", "a"), ("assistant", "bb"), ("user", "c"), ("assistant", "dddd")),
          chat_line(("user", "e"), ("assistant", "ffffff")), name="in.jsonl")
    _, metrics = run_stage(tmp_path, "out", path="in.jsonl", format="chat")
    assert metrics == {"rows": 2.0, "mean_turns": 1.5, "mean_assistant_chars": 4.0}


def test_load_dataset_errors_name_the_path_param(tmp_path):
    write(tmp_path, "oops", name="in.jsonl")
    with pytest.raises(DataError, match=r"^in\.jsonl:1: "):
        run_stage(tmp_path, "out", path="in.jsonl")


def test_load_dataset_limit_keeps_first_rows(tmp_path):
    numbered_rows(tmp_path, 10)
    data, metrics = run_stage(tmp_path, "out", path="in.jsonl", limit=3)
    assert [r["messages"][0]["content"] for r in read_rows(data.parent)] == ["q0", "q1", "q2"]
    assert metrics["rows"] == 3


def test_load_dataset_shuffle_is_seeded(tmp_path):
    numbered_rows(tmp_path, 20)
    first, _ = run_stage(tmp_path, "out1", path="in.jsonl", shuffle=True)
    second, _ = run_stage(tmp_path, "out2", path="in.jsonl", shuffle=True)
    plain, _ = run_stage(tmp_path, "out3", path="in.jsonl")
    assert first.read_bytes() == second.read_bytes() != plain.read_bytes()
    assert sorted(first.read_text().splitlines()) == sorted(plain.read_text().splitlines())


def test_load_dataset_limit_must_be_positive():
    with pytest.raises(ValueError):
        LoadDatasetParams(path="x.jsonl", limit=0)


def test_path_is_an_input_file():
    assert LoadDatasetParams(path="data/x.jsonl").input_files() == ["data/x.jsonl"]


# --------------------------------------------------------------------------- shipped quickstart data


def user_prompts(rows: list[dict]) -> set[str]:
    return {m["content"] for row in rows for m in row["messages"] if m["role"] == "user"}


def test_quickstart_files_load_and_do_not_overlap():
    train = read_conversations(QUICKSTART / "train.jsonl", format="alpaca")
    evaluation = read_conversations(QUICKSTART / "eval.jsonl", format="chat")
    assert 350 <= len(train) <= 450 and 50 <= len(evaluation) <= 70
    assert not user_prompts(train) & user_prompts(evaluation)
    for row in train + evaluation:
        assert "Answer with only the answer." in row["messages"][0]["content"]


def test_quickstart_eval_items_are_held_out_of_train():
    """Ids are ``family-item[-template]``: no eval item appears in train under any template."""
    train = read_conversations(QUICKSTART / "train.jsonl")
    evaluation = read_conversations(QUICKSTART / "eval.jsonl")
    train_items = {row["id"].rsplit("-", 1)[0] for row in train}
    eval_items = {row["id"] for row in evaluation}
    assert not train_items & eval_items
    families = {item.split("-", 1)[0] for item in eval_items}
    assert len(families) == 6
