"""Content hashes for files, directories and JSON-able values (sha256, hex)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_json(value) -> str:
    return hash_bytes(canonical_json(value).encode())


def file_hashes(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by its POSIX relative path, sorted."""
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            hashes[rel] = hash_file(path)
    return hashes


def tree_hash(hashes: dict[str, str]) -> str:
    """One hash for a directory from its per-file hashes (paths included, order-independent)."""
    return hash_json(sorted(hashes.items()))


def hash_path(path: Path) -> str:
    """Content hash of a file or of a whole directory tree."""
    return tree_hash(file_hashes(path, exclude=())) if path.is_dir() else hash_file(path)
