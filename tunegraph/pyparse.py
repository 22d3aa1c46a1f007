"""``ast.parse`` behind a lock: CPython 3.11 before 3.11.8 corrupts the parser's recursion counter when
two threads parse at once ("AST constructor recursion depth mismatch", gh-106905), and a flow run
plans and validates stages from several threads."""

from __future__ import annotations

import ast
import threading

_LOCK = threading.Lock()


def parse(source: str, filename: str = "<unknown>", mode: str = "exec") -> ast.AST:
    with _LOCK:
        return ast.parse(source, filename, mode)
