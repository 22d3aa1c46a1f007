"""Conversation data: read JSONL in several formats into ONE internal schema, and validate it.

The internal schema (a ``dataset`` artifact is a directory holding :data:`DATA_FILE`) is one JSON
object per line::

    {"id": "...", "messages": [{"content": "...", "role": "user"}, {"content": "...", "role": "assistant"}]}

with keys sorted, ``ensure_ascii=False``, ``"\\n"`` line endings and rows in input order. Messages
are an optional ``system`` message, then ``user``/``assistant`` turns alternating, starting with
``user`` and ending with a non-empty ``assistant`` message (the reference answer).

Input formats live in :data:`FORMATS`, one small function per format turning a parsed JSON line
into messages; add a format by adding an entry. Every problem is a :class:`DataError` with a
one-line message ``<file>:<line>: field '<field>': <what is wrong and what to do>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tunegraph.errors import DataError
from tunegraph.hashing import canonical_json

DATA_FILE = "data.jsonl"
ROLES = ("system", "user", "assistant")
ID_HEX_CHARS = 16

Message = dict[str, str]
Row = dict[str, Any]


# --------------------------------------------------------------------------- error locations


@dataclass(frozen=True)
class Where:
    """A line of an input file, for error messages (``file`` is the path as the user gave it)."""

    file: str
    line: int

    def error(self, problem: str, field: str | None = None) -> DataError:
        """A one-line :class:`DataError` naming file, line and (optionally) field."""
        field_part = f"field {field!r}: " if field else ""
        return DataError(_one_line(f"{self.file}:{self.line}: {field_part}{problem}"))


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _show(value: Any, limit: int = 40) -> str:
    """A short, one-line rendering of a bad value (Python repr, truncated)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a user would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


_EXPECTED = {str: "a string", list: "a list", dict: "an object"}


def _field(obj: dict, key: str, expected: type, where: Where, path: str, hint: str = "") -> Any:
    """``obj[key]`` checked to be present and of type ``expected`` (str, list or dict)."""
    if key not in obj:
        raise where.error(f"missing{'; ' + hint if hint else ''}", path)
    return _typed(obj[key], expected, where, path)


def _typed(value: Any, expected: type, where: Where, path: str) -> Any:
    """``value`` checked to be of type ``expected`` (str, list or dict)."""
    if not isinstance(value, expected):
        raise where.error(f"expected {_EXPECTED[expected]}, got {_json_type(value)} {_show(value)}", path)
    return value


# --------------------------------------------------------------------------- input formats


def _messages_from_chat(obj: dict, where: Where) -> list[Message]:
    """OpenAI chat format: ``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    raw = _field(obj, "messages", list, where, "messages", "a chat row is {\"messages\": [{\"role\", \"content\"}, ...]}")
    messages = []
    for index, item in enumerate(raw):
        path = f"messages[{index}]"
        message = _typed(item, dict, where, path)
        role = _field(message, "role", str, where, f"{path}.role", "each message needs 'role' and 'content'")
        if role not in ROLES:
            raise where.error(f"expected one of {', '.join(ROLES)}, got {_show(role)}", f"{path}.role")
        content = _field(message, "content", str, where, f"{path}.content", "each message needs 'role' and 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _messages_from_alpaca(obj: dict, where: Where) -> list[Message]:
    """Alpaca format: ``{"instruction", "input" (optional), "output"}`` -> one user/assistant turn."""
    hint = "an alpaca row is {\"instruction\", \"input\" (optional), \"output\"}"
    instruction = _field(obj, "instruction", str, where, "instruction", hint)
    if not instruction.strip():
        raise where.error("is empty; write the task for the model", "instruction")
    extra_input = _typed(obj["input"], str, where, "input") if "input" in obj else ""
    output = _field(obj, "output", str, where, "output", hint)
    if not output.strip():
        raise where.error("is empty; give the reference answer or drop the row", "output")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


@dataclass(frozen=True)
class RowFormat:
    """An input format: keys that identify it (for ``auto``) and its row -> messages reader."""

    name: str
    signature_keys: tuple[str, ...]
    to_messages: Callable[[dict, Where], list[Message]]


FORMATS: dict[str, RowFormat] = {
    "chat": RowFormat("chat", ("messages",), _messages_from_chat),
    "alpaca": RowFormat("alpaca", ("instruction", "output"), _messages_from_alpaca),
}


def detect_format(obj: dict, where: Where) -> RowFormat:
    """The first format whose signature keys appear in ``obj`` (the file's first row)."""
    for row_format in FORMATS.values():
        if any(key in obj for key in row_format.signature_keys):
            return row_format
    keys = ", ".join(repr(k) for k in sorted(obj)) or "none"
    known = "; ".join(f"{f.name}: {' or '.join(map(repr, f.signature_keys))}" for f in FORMATS.values())
    raise where.error(f"cannot detect the data format from keys {keys}; expected keys of {known} (or set 'format')")


# --------------------------------------------------------------------------- validation


def check_role_order(messages: list[Message], where: Where) -> None:
    """Optional system first, then user/assistant alternating from user, ending with a non-empty assistant."""
    turns_start = 1 if messages and messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[turns_start:], start=turns_start):
        expected = "user" if (index - turns_start) % 2 == 0 else "assistant"
        if message["role"] == "system":
            raise where.error("a 'system' message is only allowed first", f"messages[{index}].role")
        if message["role"] != expected:
            raise where.error(
                f"expected {expected!r} (turns alternate user/assistant, starting with user), "
                f"got {message['role']!r}",
                f"messages[{index}].role",
            )
    if len(messages) == turns_start:
        raise where.error("has no user/assistant turns; a row needs a user message and an assistant reply", "messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise where.error("the last message must be the assistant's reply, got 'user'; add the reference answer",
                          f"messages[{last}].role")
    if not messages[last]["content"].strip():
        raise where.error("the final assistant message is empty; give the reference answer or drop the row",
                          f"messages[{last}].content")


def derived_id(messages: list[Message]) -> str:
    """A deterministic id for a row without one: sha256 of the messages' canonical JSON, shortened."""
    return hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def _row_id(obj: dict, messages: list[Message], where: Where) -> str:
    if "id" not in obj:
        return derived_id(messages)
    row_id = _typed(obj["id"], str, where, "id")
    if not row_id:
        raise where.error("is empty; give a non-empty id or leave the key out", "id")
    return row_id


class _DuplicateCheck:
    """Remembers the line of every id seen so far and rejects a second occurrence."""

    def __init__(self) -> None:
        self.first_line: dict[str, int] = {}

    def add(self, row_id: str, explicit: bool, where: Where) -> None:
        if row_id in self.first_line:
            earlier = self.first_line[row_id]
            if explicit:
                raise where.error(f"duplicate id {row_id!r} (also on line {earlier}); remove the duplicate "
                                  "or give it another id", "id")
            raise where.error(f"row repeats line {earlier} (same messages, derived id {row_id!r}); "
                              "remove the duplicate", "messages")
        self.first_line[row_id] = where.line


# --------------------------------------------------------------------------- reading files


def _read_text(path: Path, name: str) -> str:
    """The file's text; a missing file or non-UTF-8 bytes are :class:`DataError`."""
    if path.is_dir():
        raise DataError(f"{name}: is a directory, expected a .jsonl file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found (looked at {path}); check the path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{name}:{line}: not UTF-8 at byte {exc.start}: re-encode the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _json_lines(text: str, name: str) -> Iterator[tuple[Where, dict]]:
    """(location, object) for each non-blank line; bad JSON or a non-object line is a DataError.

    Lines split on ``"\\n"`` only (JSON strings may hold U+2028 and friends verbatim).
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = Where(name, number)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise where.error(f"line is not valid JSON: {exc.msg} at column {exc.colno}; "
                              "each line must hold one JSON object") from None
        if not isinstance(obj, dict):
            raise where.error(f"line is {_json_type(obj)}, expected a JSON object")
        yield where, obj


def parse_rows(text: str, name: str, format: str = "auto") -> list[Row]:
    """Rows in the internal schema from JSONL ``text``; ``name`` is the file named in errors."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"{name}: unknown format {format!r}; expected auto, {', '.join(FORMATS)}")
    row_format = None if format == "auto" else FORMATS[format]
    duplicates = _DuplicateCheck()
    rows = []
    for where, obj in _json_lines(text, name):
        if row_format is None:
            row_format = detect_format(obj, where)
        messages = row_format.to_messages(obj, where)
        check_role_order(messages, where)
        row_id = _row_id(obj, messages, where)
        duplicates.add(row_id, "id" in obj, where)
        rows.append({"id": row_id, "messages": messages})
    if not rows:
        raise DataError(f"{name}: file has no rows; expected one JSON object per line")
    return rows


def read_conversations(path: str | Path, format: str = "auto", name: str | None = None) -> list[Row]:
    """Read and validate a JSONL file in ``format`` (``auto``, ``chat``, ``alpaca``).

    ``name`` is how errors refer to the file (default: ``path`` as given).
    """
    display = str(path) if name is None else name
    return parse_rows(_read_text(Path(path), display), display, format)


# --------------------------------------------------------------------------- internal format


def row_line(row: Row) -> str:
    """One row as its canonical JSONL line (keys sorted, non-ASCII kept, no trailing newline)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def write_rows(rows: Iterable[Row], path: str | Path) -> int:
    """Write rows in the internal format to the file ``path``; returns the number written."""
    lines = [row_line({"id": row["id"], "messages": row["messages"]}) + "\n" for row in rows]
    Path(path).write_bytes("".join(lines).encode("utf-8"))
    return len(lines)


def dataset_file(artifact_dir: str | Path) -> Path:
    """The JSONL file of a ``dataset`` artifact directory."""
    return Path(artifact_dir) / DATA_FILE


def read_rows(artifact_dir: str | Path) -> list[Row]:
    """Rows of a ``dataset`` artifact (a directory holding ``data.jsonl``, or that file itself)."""
    path = Path(artifact_dir)
    file = path if path.is_file() else dataset_file(path)
    return read_conversations(file, format="chat")


def prompt_and_reference(row: Row) -> tuple[list[Message], str]:
    """The conversation up to the final assistant message, and that message's text."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"row {row.get('id')!r}: the last message must be the assistant's reference answer")
    return [dict(m) for m in messages[:-1]], messages[-1]["content"]


def assistant_messages(row: Row) -> list[str]:
    """The text of every assistant message of a row."""
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
