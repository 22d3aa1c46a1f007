"""Records from data files: JSONL, a JSON list, or Parquet, each record with where it came from.

The file type follows the suffix: ``.json`` is one JSON list of objects, ``.parquet``/``.pq`` is a
Parquet table (one record per row), anything else is JSONL (one object per line). Every record
comes with a :class:`Where` so that errors name the file and the line (JSONL), the line and list
index (JSON) or the row index (Parquet). Nothing here knows about chat formats; see
:mod:`tunegraph.chat_data`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunegraph.errors import DataError

JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Where:
    """Where a record is: ``file`` as the user gave it, a 1-based ``line`` of a text file and,
    for JSON lists and Parquet tables, the 0-based ``row`` index."""

    file: str
    line: int | None
    row: int | None = None

    @property
    def prefix(self) -> str:
        """``file:line``, ``file:line: row[i]`` or ``file: row[i]`` (the start of an error message)."""
        text = self.file if self.line is None else f"{self.file}:{self.line}"
        return text if self.row is None else f"{text}: row[{self.row}]"

    @property
    def label(self) -> str:
        """How another message refers to this record: ``line 3`` or ``row[2]``."""
        return f"line {self.line}" if self.row is None else f"row[{self.row}]"

    def error(self, problem: str, field: str | None = None) -> DataError:
        """A one-line :class:`DataError` naming the file, the record and (optionally) the field."""
        field_part = f"field {field!r}: " if field else ""
        return DataError(one_line(f"{self.prefix}: {field_part}{problem}"))


def one_line(text: str) -> str:
    return " ".join(text.splitlines())


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a user would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"  # a Parquet binary column
    if isinstance(value, list):
        return "a list"
    return "an object"


# --------------------------------------------------------------------------- text files


def read_text(path: Path, name: str) -> str:
    """The file's text; a missing file or non-UTF-8 bytes are :class:`DataError`."""
    if path.is_dir():
        raise DataError(f"{name}: is a directory, expected a .jsonl, .json or .parquet file")
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


def jsonl_records(text: str, name: str) -> Iterator[tuple[Where, dict]]:
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
            raise where.error(f"line is {json_type(obj)}, expected a JSON object")
        yield where, obj


_WHITESPACE = " \t\n\r"


def json_list_records(text: str, name: str) -> Iterator[tuple[Where, dict]]:
    """(location, object) for each element of a JSON list; errors name the element's line and index.

    The list is decoded one element at a time (``raw_decode``) so that each record knows the line
    it starts on; the result is the same as ``json.loads`` of the whole text.
    """
    decoder = json.JSONDecoder()
    if not text.strip():
        raise DataError(f"{name}: file is empty; expected a JSON list of objects")
    position = _skip_whitespace(text, 0)
    if text[position] != "[":
        raise DataError(f"{name}:{_line_at(text, position)}: expected a JSON list of objects, "
                        f"got text starting {text[position:position + 20]!r}; use .jsonl for one object per line")
    position = _skip_whitespace(text, position + 1)
    index = 0
    while text[position:position + 1] != "]":
        if index:
            if text[position:position + 1] != ",":
                raise DataError(f"{name}:{_line_at(text, position)}: not valid JSON: expected ',' or ']' "
                                f"after row[{index - 1}]")
            position = _skip_whitespace(text, position + 1)
        where = Where(name, _line_at(text, position), index)
        try:
            obj, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno} "
                            f"(in row[{index}])") from None
        if not isinstance(obj, dict):
            raise where.error(f"is {json_type(obj)}, expected a JSON object")
        yield where, obj
        position = _skip_whitespace(text, position)
        index += 1
        if position >= len(text):
            raise DataError(f"{name}:{_line_at(text, position)}: not valid JSON: the list is not closed with ']'")
    if text[position + 1:].strip():
        raise DataError(f"{name}:{_line_at(text, position + 1)}: not valid JSON: extra data after the list")


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


# --------------------------------------------------------------------------- Parquet


def parquet_records(path: Path, name: str) -> Iterator[tuple[Where, dict]]:
    """(location, object) for each row of a Parquet table.

    A null cell means the field is absent (Parquet has one schema for all rows, so a row without
    ``input`` reads as ``input: null``): top-level nulls are dropped from the record.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        raise DataError(f"{name}: is a directory, expected a .jsonl, .json or .parquet file")
    if not path.exists():
        raise DataError(f"{name}: file not found (looked at {path}); check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: file is empty; expected a Parquet table")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(one_line(f"{name}: not a readable Parquet file ({exc}); "
                                 "write it with pyarrow or pandas.to_parquet")) from None
    for index, record in enumerate(table.to_pylist()):
        yield Where(name, None, index), {key: value for key, value in record.items() if value is not None}


# --------------------------------------------------------------------------- dispatch


def file_kind(path: Path) -> str:
    """``json``, ``parquet`` or ``jsonl``, from the file's suffix."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "jsonl"


def read_records(path: str | Path, name: str | None = None) -> Iterator[tuple[Where, dict]]:
    """(location, object) for each record of a JSONL, JSON or Parquet file; ``name`` is how errors
    refer to the file (default: ``path`` as given)."""
    path = Path(path)
    display = str(path) if name is None else name
    kind = file_kind(path)
    if kind == "parquet":
        return parquet_records(path, display)
    text = read_text(path, display)
    return json_list_records(text, display) if kind == "json" else jsonl_records(text, display)
