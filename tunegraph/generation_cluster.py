"""Data-generation batches on a Dask cluster: the LLM calls of one stage fanned out over its workers.

A generation stage (``self_instruct``, ``evol_instruct``, ``judge``) sends its requests in fixed chunks
of the backend's batch size (:func:`tunegraph.row_cache.cached_chat`). With ``TUNEGRAPH_DASK_ADDRESS``
set to a scheduler (``tcp://head-node:8786``; ``tunegraph run --dask ADDRESS`` sets it for its stages),
the chunks a stage still needs are submitted to that cluster at once, each answered on a worker, and
written to the stage's row cache as they come back. A chunk's members and per-request seeds are the
same wherever it runs, so the dataset is the one a single process writes (bit for bit where the
worker runs the model with the stage's torch thread count, which it is given).

What runs on a worker is the backend, rebuilt from a :class:`BackendSpec` and kept for the worker's
life: a local model directory (it must be at the same path on every machine: a shared workspace, as
``--dask`` needs anyway) or an OpenAI-compatible endpoint. An endpoint's API key is read on the worker
from the variable its setting names, so the key never travels with the task.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable

from tunegraph.errors import StageError

DASK_ADDRESS_ENV = "TUNEGRAPH_DASK_ADDRESS"
CONNECT_TIMEOUT_S = 30


@dataclass(frozen=True)
class BackendSpec:
    """How to rebuild a chat backend on a worker: ``kind`` is ``local`` or ``endpoint``."""

    kind: str
    model_dir: str | None = None  # local
    dtype: str = "float32"  # local
    settings_json: str | None = None  # endpoint: LLMSettings as JSON (no secret in it)
    stage: str = ""
    role: str = ""
    batch_size: int = 1


def spec_of(backend) -> BackendSpec:
    """The spec that rebuilds ``backend`` on a worker."""
    from tunegraph.llm_backend import LocalChatBackend, OpenAIChatBackend

    if isinstance(backend, LocalChatBackend):
        return BackendSpec("local", model_dir=str(backend.model_dir), dtype=backend.dtype,
                           batch_size=backend.batch_size)
    if isinstance(backend, OpenAIChatBackend):
        return BackendSpec("endpoint", settings_json=backend.settings.model_dump_json(), stage=backend.stage,
                           role=backend.role, batch_size=backend.batch_size)
    raise TypeError(f"no worker spec for {type(backend).__name__}")


def cluster_address() -> str | None:
    return os.environ.get(DASK_ADDRESS_ENV) or None


def stage_environment() -> dict[str, str] | None:
    """The environment for a stage's child process started from a task on a Dask worker: the worker's
    own scheduler, so ``tunegraph run --dask ADDRESS`` fans generation batches out over that cluster
    too. None (inherit) outside a worker, when the variable is already set, or for an in-process
    cluster, whose address a child process cannot reach."""
    if cluster_address():
        return None
    try:
        from distributed import get_worker

        address = get_worker().scheduler.address
    except (ImportError, ValueError):  # ValueError: not running on a Dask worker
        return None
    if not address or address.startswith("inproc://"):
        return None
    return {**os.environ, DASK_ADDRESS_ENV: address}


@functools.lru_cache(maxsize=None)
def _client(address: str):
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise StageError(f"{DASK_ADDRESS_ENV}={address}: cannot reach the Dask scheduler ({error}); start it "
                         f"(`dask scheduler`) or unset {DASK_ADDRESS_ENV} to generate in this process") from None


def answer_chunks_on_cluster(spec: BackendSpec, chunks: list[tuple[list, list[int]]], sampling, threads: int,
                             on_answer: Callable[[int, list[str | None]], None], stage: str) -> None:
    """Submit every ``(conversations, seeds)`` chunk to the cluster; call ``on_answer(index, replies)``
    for each as it completes (any order: the caller puts them back in request order)."""
    from distributed import as_completed

    client = _client(cluster_address())
    futures = {client.submit(_answer_on_worker, spec, conversations, sampling, seeds, threads, pure=False): index
               for index, (conversations, seeds) in enumerate(chunks)}
    try:
        for future in as_completed(futures):
            on_answer(futures[future], future.result())
    except StageError:
        raise
    except Exception as error:  # noqa: BLE001 - a worker's failure, re-raised with the stage named
        raise StageError(f"stage {stage or '?'!r}: a generation batch failed on the Dask cluster at "
                         f"{cluster_address()} ({type(error).__name__}: {error}); finished batches are kept: "
                         f"re-run to resume") from None
    finally:
        for future in futures:
            future.cancel()


# --------------------------------------------------------------------------- on the worker

_WORKER_BACKENDS: dict[BackendSpec, object] = {}
_WORKER_LOCK = threading.Lock()  # a worker with several threads runs one local model at a time


def _answer_on_worker(spec: BackendSpec, conversations: list, sampling, seeds: list[int],
                      threads: int) -> list[str | None]:
    import torch

    with _WORKER_LOCK:
        backend = _WORKER_BACKENDS.get(spec)
        if backend is None:
            backend = _WORKER_BACKENDS[spec] = build_backend(spec)
        torch.set_num_threads(threads)  # the stage's thread count: the same bits as in the stage process
        return backend.chat(conversations, sampling, seeds)


def build_backend(spec: BackendSpec):
    from pathlib import Path

    from tunegraph.llm_backend import LLMSettings, LocalChatBackend, OpenAIChatBackend

    if spec.kind == "local":
        return LocalChatBackend(Path(spec.model_dir), spec.batch_size, spec.dtype)
    return OpenAIChatBackend(LLMSettings.model_validate_json(spec.settings_json), spec.stage, spec.role)
