"""Stages that need the accelerator, and the Prefect limit that keeps two of them off one device.

Two training or generation stages on one GPU would compete for its memory (and on a CPU machine,
for its cores), so each such stage's Prefect task carries the tag ``tunegraph:accelerator``, and
a tag concurrency limit on the Prefect API lets at most ``slots`` tasks with that tag run at once
(default 1). Prefect enforces it across every flow run that talks to the same API: ``--parallel``
threads, Dask workers and concurrent deployment runs alike. A task holds its slot from before it
starts until its last retry ends; if its process dies, the slot's lease expires a minute later.
"""

from __future__ import annotations

from tunegraph.errors import TunegraphError
from tunegraph.llm_backend import LLMStageParams
from tunegraph.recipe import Stage
from tunegraph.training.params import TrainingParams

ACCELERATOR_TAG = "tunegraph:accelerator"
DEFAULT_ACCELERATOR_SLOTS = 1


def uses_accelerator(stage: Stage) -> bool:
    """Training stages, stages that run a local LLM (generation, judging), and stages that read a model
    artifact (evaluation, merging, export...): each holds a model on the device while it runs."""
    params = stage.params
    if isinstance(params, TrainingParams):
        return True
    if isinstance(params, LLMStageParams):
        settings = [getattr(params, name) for name in params.LLM_FIELDS]
        if any(s is not None and not s.remote for s in settings):
            return True
    return any("model" in stage.kind.slot(slot).accepts for slot in stage.spec.inputs)


def stage_tags(stage: Stage) -> list[str]:
    """Prefect tags of a stage's task: its kind, plus the accelerator tag where it needs one."""
    return [f"tunegraph:{stage.kind.name}"] + ([ACCELERATOR_TAG] if uses_accelerator(stage) else [])


def ensure_accelerator_limit(slots: int | None = None) -> int:
    """Make the Prefect API limit accelerator stages; return the limit in force.

    ``slots=None`` keeps a limit already set on the API (by an operator, or an earlier run) and
    creates the default one otherwise; a number sets it.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if slots is not None and slots < 1:
        raise TunegraphError(f"--accelerator-slots must be at least 1, got {slots}")
    with get_client(sync_client=True) as client:
        if slots is None:
            try:
                return client.read_concurrency_limit_by_tag(ACCELERATOR_TAG).concurrency_limit
            except ObjectNotFound:
                slots = DEFAULT_ACCELERATOR_SLOTS
        client.create_concurrency_limit(tag=ACCELERATOR_TAG, concurrency_limit=slots)  # an upsert
    return slots
