"""How a short answer is normalized before it is compared (evaluation and rewards share the rule)."""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    """First line only, whitespace collapsed, surrounding quotes and trailing punctuation stripped.
    Case is kept: "LAZY ROAD" is not "lazy road"."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first).strip().strip("\"'`").rstrip(".!").strip()
