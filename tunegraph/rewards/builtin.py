"""The built-in rewards: small pure functions ``fn(completion, row, *, settings) -> float``.

Where the answer is in a completion (:func:`answer_span`), in this order: the last
``<answer>...</answer>``; inside it or else, the last ``\\boxed{...}``; else the text after the
last ``####`` or ``answer:`` / ``answer is``; else the whole text. The reference answer goes
through the same extraction (so a GSM8K-style ``... #### 42`` reference works), see
:func:`~tunegraph.rewards.base.reference_answer` for where it comes from.

Per-row inputs are fields of the row (``pattern``, ``schema``, ``tests``); recipe-wide ones are
settings in the spec (``regex_match(pattern=...)``); a row's field wins over the setting. A row
that lacks what a reward needs is a :class:`~tunegraph.errors.DataError` (the data is wrong,
not the completion).
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from functools import lru_cache

from tunegraph.errors import DataError
from tunegraph.rewards.base import builtin_reward, reference_answer
from tunegraph.answers import normalize_answer

# --------------------------------------------------------------------------- extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_MARKER = re.compile(r"####|\banswer\s*(?:is\s*:?|:)", re.I)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_PLAIN = r"(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"(?<![\w.])(?P<sign>[-+])?(?P<num>{_PLAIN})(?:\s*/\s*(?P<den>\d+)(?![\d.]))?")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[start:index]
    return None


def answer_span(text: str) -> tuple[str, str]:
    """``(region, kind)``: where the final answer is; kind is tag, boxed, marker or text."""
    kind = "text"
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text, kind = tags[-1], "tag"
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    if kind == "tag":
        return text, kind
    markers = list(_MARKER.finditer(text))
    if markers:
        return text[markers[-1].end():].strip().split("\n", 1)[0], "marker"
    return text, kind


def _numbers(text: str) -> list[float]:
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    text = _FRAC.sub(r"\1/\2", text)
    values = []
    for match in _NUMBER.finditer(text):
        try:
            value = Fraction(match["num"].replace(",", ""))
            if match["den"]:
                value /= int(match["den"])
        except (ValueError, ZeroDivisionError):
            continue
        values.append(float(-value if match["sign"] == "-" else value))
    return values


def extract_number(text: str) -> float | None:
    """The final numeric answer of ``text``: the first number after an ``answer:`` marker or
    ``####``, else the last number of the answer region (see :func:`answer_span`). Handles
    negatives, decimals, exponents, thousands separators (``1,234``), ``a/b`` and
    ``\\frac{a}{b}``; units and ``$``/``%`` around the number are ignored. None if there is none."""
    region, kind = answer_span(text)
    values = _numbers(region)
    if not values:
        return None
    return values[0] if kind == "marker" else values[-1]


def extract_code(completion: str) -> str:
    """The code of a completion: the last ```python (or ```py) block, else the last fenced block
    without a language, else the whole completion."""
    blocks = _FENCE.findall(completion)
    for wanted in (("python", "py", "python3"), ("",)):
        for language, body in reversed(blocks):
            if language.lower() in wanted:
                return body
    return completion


def extract_json_text(completion: str) -> str:
    """The JSON of a completion: the last ```json block if any, else the whole completion."""
    for language, body in reversed(_FENCE.findall(completion)):
        if language.lower() == "json":
            return body.strip()
    return completion.strip()


# --------------------------------------------------------------------------- rewards


@builtin_reward("numeric_match")
def numeric_match(completion: str, row: dict, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1.0 if the completion's final number (:func:`extract_number`) equals the reference's within
    ``rel_tol``/``abs_tol`` (:func:`math.isclose`), else 0.0. A reference without a number is a
    DataError."""
    expected = extract_number(reference_answer(row))
    if expected is None:
        raise DataError(f"row {row.get('id')!r}: numeric_match: the reference answer "
                        f"{reference_answer(row)[:60]!r} holds no number")
    got = extract_number(completion)
    return float(got is not None and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol))


@builtin_reward("exact_match")
def exact_match(completion: str, row: dict, *, case_sensitive: bool = False) -> float:
    """1.0 if the answer region of the completion equals the reference's after
    :func:`normalize_answer` (and case folding unless ``case_sensitive``), else 0.0."""
    got = normalize_answer(answer_span(completion)[0])
    expected = normalize_answer(answer_span(reference_answer(row))[0])
    if not case_sensitive:
        got, expected = got.casefold(), expected.casefold()
    return float(got == expected)


_FLAGS = {"i": re.I, "m": re.M, "s": re.S, "x": re.X}


@builtin_reward("regex_match")
def regex_match(completion: str, row: dict, *, pattern: str | None = None, flags: str = "",
                timeout_s: float = 1.0) -> float:
    """1.0 if the whole completion (surrounding whitespace stripped) matches the regular
    expression (``re`` syntax) in the row's ``pattern`` field, else the ``pattern`` setting.
    ``flags``: letters among ``imsx``. Matching gives up after ``timeout_s`` (a pathological
    pattern on a long completion scores 0 instead of hanging training)."""
    pattern = row.get("pattern", pattern)
    if not isinstance(pattern, str):
        raise DataError(f"row {row.get('id')!r}: regex_match needs a 'pattern' field or a pattern setting, "
                        "like regex_match(pattern=r'-?\\d+')")
    unknown = set(flags) - set(_FLAGS)
    if unknown:
        raise DataError(f"regex_match: unknown flag {sorted(unknown)[0]!r}; use letters among 'imsx'")
    compiled, has_timeout = _compile_regex(pattern, flags)
    text = completion.strip()
    if not has_timeout:
        return float(compiled.fullmatch(text) is not None)
    try:
        return float(compiled.fullmatch(text, timeout=timeout_s) is not None)
    except TimeoutError:
        return 0.0


@lru_cache(maxsize=256)
def _compile_regex(pattern: str, flags: str):
    """(compiled pattern, whether it takes a timeout): the ``regex`` package (a transformers
    dependency) in its ``re``-compatible mode when installed, else ``re``."""
    bits = 0
    for letter in flags:
        bits |= _FLAGS[letter]
    try:
        re.compile(pattern, bits)
    except re.error as error:
        raise DataError(f"regex_match: invalid pattern {pattern!r}: {error}") from None
    try:
        import regex
    except ImportError:
        return re.compile(pattern, bits), False
    try:
        return regex.compile(pattern, bits | regex.VERSION0), True
    except Exception:  # noqa: BLE001 - a pattern only re understands: no timeout then
        return re.compile(pattern, bits), False


@lru_cache(maxsize=256)
def _validator(schema_text: str):
    try:
        import jsonschema
    except ImportError:
        raise DataError("json_schema reward: the jsonschema package is missing: pip install jsonschema") from None
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        raise DataError(f"json_schema: invalid JSON schema {schema_text[:80]!r}: {error.message}") from None
    return cls(schema)


@builtin_reward("json_schema")
def json_schema(completion: str, row: dict, *, schema: dict | None = None) -> float:
    """1.0 if the completion (the last ```json block if present) parses as JSON and validates
    against the JSON schema in the row's ``schema`` field (an object or its JSON text), else the
    ``schema`` setting; else 0.0."""
    schema = row.get("schema", schema)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise DataError(f"row {row.get('id')!r}: json_schema: the 'schema' field is not JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise DataError(f"row {row.get('id')!r}: json_schema needs a 'schema' field (a JSON schema) "
                        "or a schema setting")
    try:
        instance = json.loads(extract_json_text(completion))
    except ValueError:
        return 0.0
    validator = _validator(json.dumps(schema, sort_keys=True))
    return float(validator.is_valid(instance))


@builtin_reward("format_tags")
def format_tags(completion: str, row: dict, *, tags: tuple[str, ...] | list[str] = ("think", "answer")) -> float:
    """1.0 if the completion is exactly the sections ``<tag>...</tag>`` in the order of ``tags``
    (default ``<think>...</think><answer>...</answer>``), each once, with only whitespace
    outside them; else 0.0. Structure only: the content is for the other rewards."""
    if not tags:
        return 1.0
    for tag in tags:
        if completion.count(f"<{tag}>") != 1 or completion.count(f"</{tag}>") != 1:
            return 0.0
    body = r"\s*".join(rf"<{re.escape(t)}>.*?</{re.escape(t)}>" for t in tags)
    return float(re.fullmatch(rf"\s*{body}\s*", completion, re.S) is not None)


@builtin_reward("code_tests")
def code_tests(completion: str, row: dict, *, timeout_s: float = 5.0, memory_mb: int = 512,
               partial: bool = True) -> float:
    """Run the completion's code (:func:`extract_code`) then the row's ``tests`` (Python source,
    or a list of snippets, usually ``assert`` statements) in the sandbox
    (:func:`tunegraph.rewards.sandbox.run_python`). ``partial``: the fraction of top-level
    asserts that pass (a denser signal); else 1.0 only when all pass. A timeout, a crash or a
    syntax error in the code scores 0."""
    from tunegraph.rewards.sandbox import run_python

    tests = row.get("tests")
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
    if not isinstance(tests, str) or not tests.strip():
        raise DataError(f"row {row.get('id')!r}: code_tests needs a 'tests' field: Python asserts "
                        "(a string or a list of strings)")
    try:
        compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as error:
        raise DataError(f"row {row.get('id')!r}: code_tests: the 'tests' field is not valid Python: {error}") from None
    result = run_python(extract_code(completion), tests, timeout_s=timeout_s, memory_mb=memory_mb)
    if not partial or result.tests_total == 0:
        return float(result.passed)
    return result.tests_passed / result.tests_total
