"""A stage's finished LLM replies, kept on disk so that a re-run after a crash resumes instead of restarting.

Each reply is one JSON line ``{"key", "reply"}`` appended to a file in the stage's checkpoint
directory. The runner names that directory after the stage fingerprint, so a changed recipe never
reuses old replies, and deletes it once the artifact is committed. A stage called without a
checkpoint directory (a unit test) keeps replies in memory only.

Requests are sent in fixed chunks of the backend's batch size, and a chunk is written whole after
it is answered: a resumed run skips the chunks on disk and sends the others exactly as an
uninterrupted run would (same members, same per-request seeds), so it writes the same dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunegraph.context import StageContext
from tunegraph.generation_cluster import answer_chunks_on_cluster, cluster_address, spec_of
from tunegraph.hashing import hash_json
from tunegraph.llm_backend import ChatBackend, Conversation, Sampling, request_seed

REPLIES_FILE = "replies.jsonl"
_MISSING = object()


class RowCache:
    """Replies by request key, loaded from (and appended to) ``path`` when one is given."""

    def __init__(self, path: Path | None, stage: str = ""):
        self.path = path
        self.stage = stage  # named in errors
        self._replies: dict[str, str | None] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: its chunk is incomplete and is sent again
                self._replies[entry["key"]] = entry["reply"]
        self.resumed = len(self._replies)  # replies found on disk when the stage started

    @classmethod
    def for_stage(cls, ctx: StageContext, name: str = REPLIES_FILE) -> "RowCache":
        return cls(ctx.checkpoint_dir / name if ctx.checkpoint_dir is not None else None, ctx.stage)

    def __contains__(self, key: str) -> bool:
        return key in self._replies

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        return self._replies[key]

    def add_chunk(self, replies: dict[str, str | None]) -> None:
        """Record a whole answered chunk, durably, before the stage moves on."""
        self._replies.update(replies)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"key": k, "reply": v}, ensure_ascii=False) + "\n" for k, v in replies.items())
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())


@dataclass(frozen=True)
class ChatRequest:
    key: str  # unique within the stage; also seeds the request's sampling
    conversation: Conversation


def chat_request(label: str, conversation: Conversation) -> ChatRequest:
    """A request keyed by ``label`` (which part of the stage asks, and which attempt) and its content."""
    return ChatRequest(f"{label}:{hash_json(conversation)[:16]}", conversation)


@dataclass
class ChatCounts:
    """What a stage's LLM calls did (run-dependent: these go to timings, not metrics)."""

    sent: int = 0  # requests answered by the backend in this run
    reused: int = 0  # requests answered from the row cache


def cached_chat(backend: ChatBackend, cache: RowCache, requests: list[ChatRequest], sampling: Sampling, seed: int,
                counts: ChatCounts | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> list[str | None]:
    """One reply per request, in request order: from the cache where a whole chunk is there, else asked
    (on the Dask cluster named by ``TUNEGRAPH_DASK_ADDRESS`` when it is set, see
    :mod:`tunegraph.generation_cluster`; in this process otherwise)."""
    keys = [request.key for request in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("chat request keys must be unique within a stage")
    counts = counts if counts is not None else ChatCounts()
    chunks = [requests[start:start + backend.batch_size] for start in range(0, len(requests), backend.batch_size)]
    missing = [chunk for chunk in chunks if not all(request.key in cache for request in chunk)]
    counts.reused += sum(len(chunk) for chunk in chunks) - sum(len(chunk) for chunk in missing)
    done = len(requests) - sum(len(chunk) for chunk in missing)

    def record(chunk: list[ChatRequest], answered: list[str | None]) -> None:
        nonlocal done
        cache.add_chunk({request.key: reply for request, reply in zip(chunk, answered)})
        counts.sent += len(chunk)
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, len(requests))

    jobs = [([r.conversation for r in chunk], [request_seed(seed, r.key) for r in chunk]) for chunk in missing]
    if cluster_address() and len(missing) > 1:
        import torch

        answer_chunks_on_cluster(spec_of(backend), jobs, sampling, torch.get_num_threads(),
                                 lambda index, answered: record(missing[index], answered), cache.stage)
    else:
        for chunk, (conversations, seeds) in zip(missing, jobs):
            record(chunk, backend.chat(conversations, sampling, seeds))
    return [cache.get(key) for key in keys]
