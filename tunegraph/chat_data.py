"""Conversation data: read JSONL, JSON or Parquet in several formats into ONE internal schema, and validate it.

The internal schema (a ``dataset`` artifact is a directory holding :data:`DATA_FILE`) is one JSON
object per line::

    {"id": "...", "messages": [{"content": "...", "role": "user"}, {"content": "...", "role": "assistant"}]}

with keys sorted, ``ensure_ascii=False``, ``"\\n"`` line endings and rows in input order. Messages
are an optional ``system`` message, then ``user``/``assistant`` turns alternating, starting with
``user`` and ending with a non-empty ``assistant`` message (the reference answer).

Preference data keeps the same shape: ``messages`` is the prompt plus the *chosen* reply (so an
SFT stage can train on chosen answers), and ``rejected`` holds the rejected reply's text. Unpaired
feedback (KTO) is ``messages`` = prompt + completion with a boolean ``label`` (desirable or not).
A verifiable task (GRPO/DAPO) is ``messages`` = prompt + the reference answer, and keeps that answer
as a string in ``answer`` (what the rewards compare with). Rows may also carry a numeric ``score``
(e.g. from an LLM judge), which filters keep and data cards plot.

Input formats live in :data:`FORMATS`, one small function per format turning a parsed record
into messages and extra fields; add a format by adding an entry. Files are JSONL, a JSON list or
Parquet (see :mod:`tunegraph.data.sources`). Every problem is a :class:`DataError` with a one-line
message ``<file>:<line>: field '<field>': <what is wrong and what to do>`` (``<file>: row[<i>]: ...``
for Parquet, ``<file>:<line>: row[<i>]: ...`` for a JSON list).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tunegraph.data.sources import Where, file_kind, json_type, jsonl_records, read_records
from tunegraph.errors import DataError
from tunegraph.hashing import canonical_json

DATA_FILE = "data.jsonl"
ROLES = ("system", "user", "assistant")
ID_HEX_CHARS = 16

Message = dict[str, str]
Row = dict[str, Any]


def _show(value: Any, limit: int = 40) -> str:
    """A short, one-line rendering of a bad value (Python repr, truncated)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED = {str: "a string", list: "a list", dict: "an object"}


def _field(obj: dict, key: str, expected: type, where: Where, path: str, hint: str = "") -> Any:
    """``obj[key]`` checked to be present and of type ``expected`` (str, list or dict)."""
    if key not in obj:
        raise where.error(f"missing{'; ' + hint if hint else ''}", path)
    return _typed(obj[key], expected, where, path)


def _typed(value: Any, expected: type, where: Where, path: str) -> Any:
    """``value`` checked to be of type ``expected`` (str, list or dict)."""
    if not isinstance(value, expected):
        raise where.error(f"expected {_EXPECTED[expected]}, got {json_type(value)} {_show(value)}", path)
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
        raise where.error(f"expected a string or one assistant message, got {json_type(value)} {_show(value)}", key)
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
        raise where.error(f"expected true or false, got {json_type(obj['label'])} {_show(obj['label'])}", "label")
    return prompt + [{"role": "assistant", "content": completion}], {"label": obj["label"]}


def _messages_from_sharegpt(obj: dict, where: Where) -> list[Message]:
    """ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``.

    ``user`` and ``assistant`` are accepted as ``from`` too (some exports mix the two vocabularies).
    """
    hint = "a ShareGPT row is {\"conversations\": [{\"from\": \"human\"|\"gpt\"|\"system\", \"value\"}, ...]}"
    raw = _field(obj, "conversations", list, where, "conversations", hint)
    messages = []
    for index, item in enumerate(raw):
        path = f"conversations[{index}]"
        turn = _typed(item, dict, where, path)
        speaker = _field(turn, "from", str, where, f"{path}.from", "each turn needs 'from' and 'value'")
        if speaker not in SHAREGPT_ROLES:
            raise where.error(f"expected one of human, gpt, system, got {_show(speaker)}", f"{path}.from")
        value = _field(turn, "value", str, where, f"{path}.value", "each turn needs 'from' and 'value'")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


def _messages_from_prompt_completion(obj: dict, where: Where) -> list[Message]:
    """``{"prompt", "completion"}`` (no label): the prompt (a string or messages) and its reply."""
    hint = "a prompt/completion row is {\"prompt\", \"completion\"}"
    prompt = _prompt_messages(obj, where, hint)
    return prompt + [{"role": "assistant", "content": _reply_text(obj, "completion", where, hint)}]


def _task_from_verifiable(obj: dict, where: Where) -> tuple[list[Message], dict]:
    """Verifiable task ``{"prompt", "answer"}`` -> prompt + the answer as the reference reply, and ``answer``.

    The answer is also the final assistant message, so evaluation has a reference and GRPO's prompt is
    ``messages[:-1]``; a number is kept as its JSON text (``42``, ``0.5``).
    """
    hint = "a verifiable task is {\"prompt\", \"answer\"}"
    prompt = _prompt_messages(obj, where, hint)
    answer = _answer_text(obj, where, hint)
    return prompt + [{"role": "assistant", "content": answer}], {"answer": answer}


def _answer_text(obj: dict, where: Where, hint: str) -> str:
    if "answer" not in obj:
        raise where.error(f"missing; {hint}", "answer")
    value = obj["answer"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    if not isinstance(value, str):
        raise where.error(f"expected a string or a number, got {json_type(value)} {_show(value)}", "answer")
    if not value.strip():
        raise where.error("is empty; give the reference answer or drop the row", "answer")
    return value


def _no_extras(reader: Callable[[dict, Where], list[Message]]) -> Callable[[dict, Where], tuple[list[Message], dict]]:
    return lambda obj, where: (reader(obj, where), {})


@dataclass(frozen=True)
class TurnFields:
    """How a format names its turns, so role-order errors point at the user's own field names."""

    list_key: str
    role_key: str
    content_key: str
    role_names: tuple[tuple[str, str], ...] = ()  # internal role -> the format's word, where it differs

    def path(self, index: int, key: str | None = None) -> str:
        return f"{self.list_key}[{index}]" + (f".{key}" if key else "")

    def role(self, role: str) -> str:
        return dict(self.role_names).get(role, role)


CHAT_TURNS = TurnFields("messages", "role", "content")
SHAREGPT_TURNS = TurnFields("conversations", "from", "value", (("user", "human"), ("assistant", "gpt")))


@dataclass(frozen=True)
class RowFormat:
    """An input format: keys that identify it (for ``auto``) and its row -> (messages, extras) reader."""

    name: str
    signature_keys: tuple[str, ...]
    to_row: Callable[[dict, Where], tuple[list[Message], dict]]
    turns: TurnFields = CHAT_TURNS


# ``auto`` takes the first format whose signature keys appear in the first row, so the order matters:
# unpaired ({prompt, completion, label}) before prompt_completion ({prompt, completion}).
FORMATS: dict[str, RowFormat] = {
    "chat": RowFormat("chat", ("messages",), _no_extras(_messages_from_chat)),
    "sharegpt": RowFormat("sharegpt", ("conversations",), _no_extras(_messages_from_sharegpt), SHAREGPT_TURNS),
    "alpaca": RowFormat("alpaca", ("instruction", "output"), _no_extras(_messages_from_alpaca)),
    "preference": RowFormat("preference", ("chosen", "rejected"), _pair_from_preference),
    "unpaired": RowFormat("unpaired", ("label",), _unpaired_from_feedback),
    "prompt_completion": RowFormat("prompt_completion", ("completion",), _no_extras(_messages_from_prompt_completion)),
    "verifiable": RowFormat("verifiable", ("answer",), _task_from_verifiable),
}
EXTRA_FIELDS = ("rejected", "label", "answer", "score")  # the row fields besides id and messages


def _internal_row(obj: dict, where: Where) -> tuple[list[Message], dict]:
    """A row of a dataset artifact: chat messages plus the extras the formats (or a judge) add."""
    extras = {}
    for key in ("rejected", "answer"):
        if key in obj:
            extras[key] = _typed(obj[key], str, where, key)
    if "label" in obj:
        if not isinstance(obj["label"], bool):
            raise where.error(f"expected true or false, got {_show(obj['label'])}", "label")
        extras["label"] = obj["label"]
    if "score" in obj:
        if isinstance(obj["score"], bool) or not isinstance(obj["score"], (int, float)):
            raise where.error(f"expected a number, got {json_type(obj['score'])} {_show(obj['score'])}", "score")
        extras["score"] = obj["score"]
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


def check_role_order(messages: list[Message], where: Where, turns: TurnFields = CHAT_TURNS) -> None:
    """Optional system first, then user/assistant alternating from user, ending with a non-empty assistant.

    ``turns`` names the fields in the format the row was read from (``conversations[2].from``...).
    """
    turns_start = 1 if messages and messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[turns_start:], start=turns_start):
        expected = "user" if (index - turns_start) % 2 == 0 else "assistant"
        if message["role"] == "system":
            raise where.error(f"a {turns.role('system')!r} message is only allowed first",
                              turns.path(index, turns.role_key))
        if message["role"] != expected:
            raise where.error(
                f"expected {turns.role(expected)!r} (turns alternate {turns.role('user')}/{turns.role('assistant')}, "
                f"starting with {turns.role('user')}), got {turns.role(message['role'])!r}",
                turns.path(index, turns.role_key),
            )
    if len(messages) == turns_start:
        raise where.error(f"has no {turns.role('user')}/{turns.role('assistant')} turns; add a "
                          f"{turns.role('user')!r} turn followed by the {turns.role('assistant')!r} reply",
                          turns.list_key)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise where.error(f"the last message must be the {turns.role('assistant')}'s reply, got "
                          f"{turns.role('user')!r}; add the reference answer", turns.path(last, turns.role_key))
    if not messages[last]["content"].strip():
        raise where.error(f"the final {turns.role('assistant')} message is empty; give the reference answer "
                          "or drop the row", turns.path(last, turns.content_key))


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
    """Remembers where every id was seen and rejects a second occurrence."""

    def __init__(self) -> None:
        self.first_seen: dict[str, str] = {}

    def add(self, row_id: str, explicit: bool, where: Where) -> None:
        if row_id in self.first_seen:
            earlier = self.first_seen[row_id]
            if explicit:
                raise where.error(f"duplicate id {row_id!r} (also on {earlier}); remove the duplicate "
                                  "or give it another id", "id")
            raise where.error(f"row repeats {earlier} (same messages, derived id {row_id!r}); "
                              "remove the duplicate", "messages")
        self.first_seen[row_id] = where.label


# --------------------------------------------------------------------------- reading files


def _resolve_format(format: str | RowFormat, name: str) -> RowFormat | None:
    """The format to read with; None means detect it from the first record."""
    if isinstance(format, RowFormat):
        return format
    if format == "auto":
        return None
    if format in FORMATS:
        return FORMATS[format]
    raise DataError(f"{name}: unknown format {format!r}; expected auto, {', '.join(FORMATS)}")


def rows_from_records(records: Iterable[tuple[Where, dict]], name: str, format: str | RowFormat = "auto") -> list[Row]:
    """Rows in the internal schema from parsed records; ``name`` is the file named in errors."""
    row_format = _resolve_format(format, name)
    duplicates = _DuplicateCheck()
    rows = []
    for where, obj in records:
        if row_format is None:
            row_format = detect_format(obj, where)
        messages, extras = row_format.to_row(obj, where)
        check_role_order(messages, where, row_format.turns)
        row_id = _row_id(obj, messages, where, extras)
        duplicates.add(row_id, "id" in obj, where)
        rows.append({"id": row_id, "messages": messages, **extras})
    if not rows:
        kind = file_kind(Path(name))
        expected = {"json": "a JSON list of objects", "parquet": "a table with one row per example"}.get(
            kind, "one JSON object per line")
        raise DataError(f"{name}: file has no rows; expected {expected}")
    return rows


def parse_rows(text: str, name: str, format: str | RowFormat = "auto") -> list[Row]:
    """Rows in the internal schema from JSONL ``text``; ``name`` is the file named in errors."""
    return rows_from_records(jsonl_records(text, name), name, format)


def read_conversations(path: str | Path, format: str | RowFormat = "auto", name: str | None = None) -> list[Row]:
    """Read and validate a JSONL, JSON (a list) or Parquet file in ``format`` (``auto`` or a key of
    :data:`FORMATS`); the file type follows the suffix (:func:`tunegraph.data.sources.file_kind`).

    ``name`` is how errors refer to the file (default: ``path`` as given).
    """
    display = str(path) if name is None else name
    return rows_from_records(read_records(Path(path), display), display, format)


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
