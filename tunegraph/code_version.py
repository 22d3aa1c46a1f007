"""The code version of a stage: a hash of its module and every tunegraph module it imports.

Prefect's default cache policy sees only the task function's own source; a change to a helper
that a stage calls must also invalidate the cache. We follow ``import`` statements statically
(AST, no execution) through the ``tunegraph`` namespace and hash the source files found.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

from tunegraph.hashing import hash_bytes, hash_json
from tunegraph.pyparse import parse

_ROOT = "tunegraph"


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_names(path: Path, module: str) -> set[str]:
    tree = parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {n for n in names if n == _ROOT or n.startswith(_ROOT + ".")}


@lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[tuple[str, Path], ...]:
    """(module name, source file) for ``module`` and every tunegraph module it imports, transitively."""
    seen: dict[str, Path] = {}
    frontier = [module]
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        frontier.extend(_imported_names(path, name) - seen.keys())
    return tuple(sorted(seen.items()))


def code_version(module: str) -> str:
    """Hash of the source of ``module`` and its tunegraph imports (names and bytes)."""
    return hash_json([[name, hash_bytes(path.read_bytes())] for name, path in module_closure(module)])


def code_files(module: str) -> list[Path]:
    return [path for _, path in module_closure(module)]
