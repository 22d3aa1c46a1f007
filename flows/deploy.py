"""Prefect deployments of recipes: register them on a Prefect server, then serve them or leave them to a worker.

``tunegraph deploy recipe.yaml --cron "0 3 * * *"`` registers a deployment of
:func:`~tunegraph.flows.recipe_flow.recipe_flow` whose default parameters are the recipe's absolute
path and the workspace (any parameter can be overridden per run, e.g. ``only`` or ``force``), then
serves it: this process polls the server and runs each scheduled or manually triggered flow run
in a child process, until it is stopped.

Why ``serve`` (Prefect's Runner) by default rather than a work pool and a worker: it needs nothing
but the server, it runs the flow object it was given, so the deployment keeps the task runner
chosen here (``--parallel``, ``--dask``), and it loads no code from storage. ``--no-serve`` only
registers the deployments on a process work pool for ``prefect worker start``; a worker imports
the flow by its module path from its own environment, so it needs tunegraph installed and the
workspace at the same path.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunegraph.errors import TunegraphError
from tunegraph.recipe import Recipe
from tunegraph.suggest import did_you_mean

_START_SERVER = "start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"


@dataclass(frozen=True)
class Schedule:
    """When a deployment runs by itself: a cron expression or an interval, or only when triggered."""

    cron: str | None = None
    interval_s: float | None = None

    def as_kwargs(self) -> dict[str, Any]:
        if self.cron and self.interval_s:
            raise TunegraphError("give --cron or --interval, not both")
        if self.interval_s is not None and self.interval_s <= 0:
            raise TunegraphError(f"--interval must be a positive number of seconds, got {self.interval_s}")
        return {"cron": self.cron} if self.cron else {"interval": self.interval_s} if self.interval_s else {}


def require_prefect_api() -> str:
    """The Prefect server's API URL; a deployment lives there, Prefect's temporary API would vanish with us."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise TunegraphError(f"PREFECT_API_URL is not set: deployments need a Prefect server; {_START_SERVER}")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()  # the exception, or None when healthy
    if problem is not None:
        raise TunegraphError(f"cannot reach the Prefect API at {url} ({type(problem).__name__}: "
                             f"{' '.join(str(problem).split())}); {_START_SERVER}")
    return url


def overridable_parameters() -> list[str]:
    """Flow parameters `--param` may set; the recipe path and workspace come from the command line."""
    from tunegraph.flows.recipe_flow import recipe_flow

    names = inspect.signature(recipe_flow.fn).parameters
    return [name for name in names if name not in ("recipe_path", "workspace")]


def parse_param_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["force=true", "only=[sft, eval]"]`` -> ``{"force": True, "only": ["sft", "eval"]}`` (values are YAML)."""
    allowed = overridable_parameters()
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TunegraphError(f"--param {pair!r}: write KEY=VALUE, e.g. force=true or only=[sft]")
        if key not in allowed:
            raise TunegraphError(f"--param {key!r}: not a flow parameter{did_you_mean(key, allowed)}; "
                                 f"parameters: {', '.join(allowed)}")
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise TunegraphError(f"--param {key}: {text!r} is not a YAML value") from None
    if isinstance(overrides.get("only"), str):
        overrides["only"] = [overrides["only"]]  # `only=sft` means one stage
    return overrides


@dataclass(frozen=True)
class RecipeDeployment:
    """One recipe's deployment: the flow object to run (with its task runner) and what Prefect registers."""

    name: str
    flow: Any  # prefect.Flow: recipe_flow with the chosen task runner
    settings: dict[str, Any]  # parameters, schedule, description, tags, concurrency limit, entrypoint type

    @property
    def full_name(self) -> str:
        return f"{self.flow.name}/{self.name}"


def build_deployment(recipe: Recipe, workspace: Path, *, name: str | None = None, schedule: Schedule = Schedule(),
                     overrides: dict[str, Any] | None = None, parallel: int = 1,
                     dask: str | None = None) -> RecipeDeployment:
    """The recipe flow's deployment, parameters defaulting to this recipe and workspace.

    One run of a deployment at a time (``concurrency_limit=1``; later ones wait): two runs of one
    recipe would build the same artifacts.
    """
    from prefect.types.entrypoint import EntrypointType

    from tunegraph.flows.recipe_flow import recipe_flow
    from tunegraph.flows.task_runners import describe_task_runner, make_task_runner

    parameters = {"recipe_path": str(recipe.path.resolve()), "workspace": str(workspace.resolve()),
                  **(overrides or {})}
    summary = recipe.spec.description or recipe.name
    settings = dict(parameters=parameters, concurrency_limit=1, tags=["tunegraph", f"recipe:{recipe.name}"],
                    description=f"{summary} ({recipe.path.name}; {describe_task_runner(parallel, dask)})",
                    # a worker imports `tunegraph.flows.recipe_flow` from its own install, not a file from here
                    entrypoint_type=EntrypointType.MODULE_PATH, **schedule.as_kwargs())
    return RecipeDeployment(name or recipe.name, recipe_flow.with_options(task_runner=make_task_runner(parallel, dask)),
                            settings)


def prepare_tracking(recipes: list[Recipe], workspace: Path) -> None:
    """Create the MLflow store and each recipe's experiment now, once.

    Runs of different deployments may start at the same moment; the first ones in a new workspace
    would otherwise race to create the sqlite store's tables (MLflow then fails one of them with
    "table ... already exists").
    """
    from tunegraph.tracking import Tracker

    for recipe in recipes:
        Tracker.for_recipe(recipe, workspace)


def serve_deployments(deployments: list[RecipeDeployment]) -> None:
    """Register the deployments and run their scheduled and triggered flow runs until interrupted."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    # pause_on_shutdown: when nothing serves a deployment, its schedule should not pile up late runs
    runner = Runner(pause_on_shutdown=True)
    for deployment in deployments:
        # add_flow, not add_deployment: the runner then starts each run from this flow object, task
        # runner included, instead of importing the module's plain recipe_flow
        runner.add_flow(deployment.flow, name=deployment.name, **deployment.settings)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass  # the runner has paused the schedules and stopped its runs


def register_for_worker(deployments: list[RecipeDeployment], pool: str, parallel: int) -> list[str]:
    """Register the deployments on a process work pool (created if missing); returns their full names.

    A worker imports the flow itself, so the thread-pool width travels as a Prefect setting.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
    width = {"env": {"PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS": str(max(1, parallel))}}
    for deployment in deployments:
        deployment.flow.to_deployment(deployment.name, job_variables=width, **deployment.settings).apply(
            work_pool_name=pool)
    return [deployment.full_name for deployment in deployments]
