"""Conversation data: read JSONL in several formats into ONE internal schema, and validate it.

The internal schema (a ``dataset`` artifact is a directory holding :data:`DATA_FILE`) is one JSON
object per line::

    {"id": "...", "messages": [{"content": "...", "role": "user"}, {"content": "...", "role": "assistant"}]}

with keys sorted, ``ensure_ascii=False``, ``"\\n"`` line endings and rows in input order. Messages
are an optional ``system`` message, then ``user``/``assistant`` turns alternating, starting with
``user`` and ending with a non-empty ``assistant`` message (the reference answer).

Preference data keeps the same shape: ``messages`` is the prompt plus the *chosen* reply (so an
SFT stage can train on chosen answers), and ``rejected`` holds the rejected reply's text. Unpaired
feedback (KTO) is ``messages`` = prompt + completion with a boolean ``label`` (desirable or not).

Input formats live in :data:`FORMATS`, one small function per format turning a parsed JSON line
into messages and extra fields; add a format by adding an entry. Every problem is a :class:`DataError` with a
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


def _prompt_messages(obj: dict, where: Where, hint: str) -> list[Message]:
    """``prompt`` as a string (one user turn) or a list of messages ending with a user turn."""
    if "prompt" not in obj:
        raise where.error(f"missing; {hint}", "prompt")
    if isinstance(obj["prompt"], str):
        if not obj["prompt"].strip():
            raise where.error("is empty; write the prompt", "prompt")
        return [{"role": "user", "content": obj["prompt"]}]
    return _messages_from_chat({"messages": _typed(obj["prompt"], list, where, "prompt")}, where)


def _reply_text(obj: dict, key: str, where: Where, hint: str) -> str:
    """A reply given as a string or as ``[{"role": "assistant", "content": ...}]``."""
    if key not in obj:
        raise where.error(f"missing; {hint}", key)
    value = obj[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise where.error(f"expected a string or one assistant message, got {_json_type(value)} {_show(value)}", key)
    if not value.strip():
        raise where.error("is empty; give the reply text or drop the row", key)
    return value


def _pair_from_preference(obj: dict, where: Where) -> tuple[list[Message], dict]:
    """Preference pair ``{"prompt", "chosen", "rejected"}`` -> prompt + chosen, and ``rejected``."""
    hint = "a preference row is {\"prompt\", \"chosen\", \"rejected\"}"
    prompt = _prompt_messages(obj, where, hint)
    chosen, rejected = _reply_text(obj, "chosen", where, hint), _reply_text(obj, "rejected", where, hint)
    if chosen == rejected:
        raise where.error("equals 'chosen'; a preference pair needs two different replies", "rejected")
    return prompt + [{"role": "assistant", "content": chosen}], {"rejected": rejected}


def _unpaired_from_feedback(obj: dict, where: Where) -> tuple[list[Message], dict]:
    """Unpaired feedback ``{"prompt", "completion", "label": true|false}`` (KTO) -> prompt + completion."""
    hint = "an unpaired feedback row is {\"prompt\", \"completion\", \"label\": true|false}"
    prompt = _prompt_messages(obj, where, hint)
    completion = _reply_text(obj, "completion", where, hint)
    if "label" not in obj:
        raise where.error(f"missing; {hint}", "label")
    if not isinstance(obj["label"], bool):
        raise where.error(f"expected true or false, got {_json_type(obj['label'])} {_show(obj['label'])}", "label")
    return prompt + [{"role": "assistant", "content": completion}], {"label": obj["label"]}


def _no_extras(reader: Callable[[dict, Where], list[Message]]) -> Callable[[dict, Where], tuple[list[Message], dict]]:
    return lambda obj, where: (reader(obj, where), {})


@dataclass(frozen=True)
class RowFormat:
    """An input format: keys that identify it (for ``auto``) and its row -> (messages, extras) reader."""

    name: str
    signature_keys: tuple[str, ...]
    to_row: Callable[[dict, Where], tuple[list[Message], dict]]


FORMATS: dict[str, RowFormat] = {
    "chat": RowFormat("chat", ("messages",), _no_extras(_messages_from_chat)),
    "alpaca": RowFormat("alpaca", ("instruction", "output"), _no_extras(_messages_from_alpaca)),
    "preference": RowFormat("preference", ("chosen", "rejected"), _pair_from_preference),
    "unpaired": RowFormat("unpaired", ("label",), _unpaired_from_feedback),
}
EXTRA_FIELDS = ("rejected", "label")  # the row fields besides id and messages that formats may add


def _internal_row(obj: dict, where: Where) -> tuple[list[Message], dict]:
    """A row of a dataset artifact: chat messages plus the extras preference/feedback formats add."""
    extras = {}
    if "rejected" in obj:
        extras["rejected"] = _typed(obj["rejected"], str, where, "rejected")
    if "label" in obj:
        if not isinstance(obj["label"], bool):
            raise where.error(f"expected true or false, got {_show(obj['label'])}", "label")
        extras["label"] = obj["label"]
    return _messages_from_chat(obj, where), extras


INTERNAL_FORMAT = RowFormat("internal", ("messages",), _internal_row)


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


def derived_id(messages: list[Message], extras: dict | None = None) -> str:
    """A deterministic id for a row without one: sha256 of its canonical JSON, shortened."""
    content = {"messages": messages, **extras} if extras else messages
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def _row_id(obj: dict, messages: list[Message], where: Where, extras: dict | None = None) -> str:
    if "id" not in obj:
        return derived_id(messages, extras)
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


def parse_rows(text: str, name: str, format: str | RowFormat = "auto") -> list[Row]:
    """Rows in the internal schema from JSONL ``text``; ``name`` is the file named in errors."""
    if isinstance(format, RowFormat):
        row_format = format
    elif format == "auto":
        row_format = None
    elif format in FORMATS:
        row_format = FORMATS[format]
    else:
        raise DataError(f"{name}: unknown format {format!r}; expected auto, {', '.join(FORMATS)}")
    duplicates = _DuplicateCheck()
    rows = []
    for where, obj in _json_lines(text, name):
        if row_format is None:
            row_format = detect_format(obj, where)
        messages, extras = row_format.to_row(obj, where)
        check_role_order(messages, where)
        row_id = _row_id(obj, messages, where, extras)
        duplicates.add(row_id, "id" in obj, where)
        rows.append({"id": row_id, "messages": messages, **extras})
    if not rows:
        raise DataError(f"{name}: file has no rows; expected one JSON object per line")
    return rows


def read_conversations(path: str | Path, format: str | RowFormat = "auto", name: str | None = None) -> list[Row]:
    """Read and validate a JSONL file in ``format`` (``auto`` or a key of :data:`FORMATS`).

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
    lines = [row_line({"id": row["id"], "messages": row["messages"],
                       **{k: row[k] for k in EXTRA_FIELDS if k in row}}) + "\n" for row in rows]
    Path(path).write_bytes("".join(lines).encode("utf-8"))
    return len(lines)


def dataset_file(artifact_dir: str | Path) -> Path:
    """The JSONL file of a ``dataset`` artifact directory."""
    return Path(artifact_dir) / DATA_FILE


def read_rows(artifact_dir: str | Path) -> list[Row]:
    """Rows of a ``dataset`` artifact (a directory holding ``data.jsonl``, or that file itself)."""
    path = Path(artifact_dir)
    file = path if path.is_file() else dataset_file(path)
    return read_conversations(file, format=INTERNAL_FORMAT)


def prompt_and_reference(row: Row) -> tuple[list[Message], str]:
    """The conversation up to the final assistant message, and that message's text."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"row {row.get('id')!r}: the last message must be the assistant's reference answer")
    return [dict(m) for m in messages[:-1]], messages[-1]["content"]


def assistant_messages(row: Row) -> list[str]:
    """The text of every assistant message of a row."""
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
