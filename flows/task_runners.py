"""Which Prefect task runner runs a recipe's stages: a thread pool, a local Dask cluster, or an existing one.

A stage's task does little itself: it checks the cache and starts ``tunegraph stage`` as a child
process, which does the work. So a thread per concurrent stage is enough on one machine, and on a
Dask cluster each stage's child process runs on the machine of the worker that picked the task.

A local cluster runs its workers as threads of this process (``processes=False``): the work is in
the child processes anyway, and worker threads share this process's Prefect API client. Worker
*processes* would each import Prefect and tunegraph again, and, with no Prefect server configured,
each would start its own temporary Prefect API (flow and task runs would then be split across
APIs).
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tunegraph.errors import TunegraphError

LOCAL_DASK = "local"  # `--dask` with no address


def make_task_runner(parallel: int = 1, dask: str | None = None) -> TaskRunner:
    """``parallel`` stages at a time in threads; or on Dask: a local cluster of ``parallel``
    single-threaded workers (``dask="local"``), or the cluster whose scheduler is at ``dask``."""
    parallel = max(1, parallel)
    if dask is None:
        return ThreadPoolTaskRunner(max_workers=parallel)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise TunegraphError("--dask needs the prefect-dask package: pip install prefect-dask") from None
    if dask == LOCAL_DASK:
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": parallel, "threads_per_worker": 1, "processes": False,
                                              "dashboard_address": None})
    return DaskTaskRunner(address=dask)


def describe_task_runner(parallel: int = 1, dask: str | None = None) -> str:
    """One line for the log: where the stages will run."""
    if dask is None:
        return f"stages run in this process's thread pool ({max(1, parallel)} at a time)"
    if dask == LOCAL_DASK:
        return f"stages run on a local Dask cluster ({max(1, parallel)} workers, 1 thread each)"
    return f"stages run on the Dask cluster at {dask}"


def check_remote_dask_api(dask: str | None, api_url: str | None) -> None:
    """A remote Dask cluster's workers report task runs to the Prefect API, so it must be a server
    they can reach, not this process's temporary one."""
    if dask not in (None, LOCAL_DASK) and not api_url:
        raise TunegraphError(f"--dask {dask}: the cluster's workers need a Prefect server to report to; start one "
                             "with `prefect server start` and set PREFECT_API_URL here and on the workers")
