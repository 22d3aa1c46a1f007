"""`tunegraph deploy` against a real `prefect server start`: served runs, a worker run, retries, failures,
and the accelerator concurrency limit, read back through the Prefect API."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli_env, make_tiny_workspace
from prefect_server import client_settings, prefect_server, stop, unused_port

# Two independent training stages (sft, rl) and two independent data stages (base, train_data);
# rl's reward kills its process the first time it is called, and rl allows one retry.
OPS_RECIPE = """\
name: ops
base_model: tiny:llama
seed: 11
threads: 1
stages:
  base: {uses: import_model}
  train_data: {uses: load_dataset, params: {path: train.jsonl}}
  eval_data: {uses: load_dataset, params: {path: eval.jsonl}}
  sft:
    uses: sft
    inputs: {model: base, dataset: train_data}
    params: {strategy: lora, max_steps: 1, batch_size: 4}
  rl:
    uses: grpo
    inputs: {model: base, dataset: train_data}
    retries: 1
    retry_delay_s: 0
    params: {strategy: lora, max_steps: 1, batch_size: 2, group_size: 2, max_new_tokens: 4,
             rewards: {"crash_once:reward": 1.0}}
"""
BAD_RECIPE = """\
name: ops_bad
base_model: tiny:llama
seed: 11
stages:
  train_data: {uses: load_dataset, params: {path: bad.jsonl}}
"""
# A user reward module, as a user would put it on PYTHONPATH. Its first call ends the stage process
# the way an out-of-memory kill does: not a user error, so Prefect retries the stage.
CRASH_ONCE = '''\
import os
from pathlib import Path


def reward(completion, row):
    marker = Path(os.environ["CRASH_ONCE_MARKER"])
    if not marker.exists():
        marker.write_text("crashed once\\n")
        os._exit(137)
    return 0.0
'''
RUN_TIMEOUT_S = 1200  # generous: the suite shares 2 cores with other work
TUNEGRAPH = str(Path(sys.executable).parent / "tunegraph")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server for the module; this process's client talks to it. Yields its API URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        with client_settings(url, tmp_path_factory.mktemp("client")):
            yield url


@pytest.fixture(scope="module")
def ops_workspace(tmp_path_factory) -> Path:
    ws = make_tiny_workspace(tmp_path_factory.mktemp("ops") / "ws", OPS_RECIPE)
    rows = (ws / "train.jsonl").read_text().splitlines(keepends=True)
    rows[2] = json.dumps({"instruction": "no output field"}) + "\n"
    (ws / "bad.jsonl").write_text("".join(rows))
    (ws / "bad.yaml").write_text(textwrap.dedent(BAD_RECIPE))
    return ws



def deploy_env(prefect_api: str, home: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    return cli_env(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(home), TUNEGRAPH_CACHE=str(model_cache),
                   PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_WORKER_QUERY_SECONDS="2", **extra)


@dataclass(frozen=True)
class ServedRuns:
    trained: object  # the flow run of `ops` (per-run override: without eval_data)
    failing: object  # the flow run of `ops_bad`, started at the same time
    crash_marker: Path  # left by the reward that killed rl's first attempt
    log: Path  # the serve process's output, flow runs' logs included


TRAINED = ["base", "train_data", "sft", "rl"]


@pytest.fixture(scope="module")
def served(prefect_api, ops_workspace, model_cache, tmp_path_factory):
    """`tunegraph deploy recipe.yaml bad.yaml --dask --parallel 2` serving in the background (stages on a
    local Dask cluster of 2 workers), and one run of each deployment triggered through the Prefect client
    (both at once: they share the workspace)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    scratch = tmp_path_factory.mktemp("serve")
    (scratch / "crash_once.py").write_text(CRASH_ONCE)
    marker = scratch / "crashed"
    env = deploy_env(prefect_api, scratch / "home", model_cache, PYTHONPATH=str(scratch),
                     CRASH_ONCE_MARKER=str(marker))
    log = scratch / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([TUNEGRAPH, "deploy", "recipe.yaml", "bad.yaml", "--dask", "--parallel", "2"],
                                   cwd=ops_workspace, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        with get_client(sync_client=True) as client:
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"tunegraph deploy exited {process.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    client.read_deployment_by_name("tunegraph-recipe/ops_bad")
                    break
                except ObjectNotFound:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
        yield ServedRuns(trained=run_deployment("tunegraph-recipe/ops", parameters={"only": TRAINED}, timeout=0),
                         failing=run_deployment("tunegraph-recipe/ops_bad", timeout=0), crash_marker=marker, log=log)
    finally:
        stop(process)
        print(log.read_text()[-4000:])  # pytest shows it when a test of the module failed


def wait_for_final(flow_run_id, timeout_s: float = RUN_TIMEOUT_S):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run still {run.state.name} after {timeout_s} s"
            time.sleep(2)


def stage_task_runs(flow_run_id, expected: set[str]) -> dict[str, tuple]:
    """{stage: (task run, its states oldest first)}; waits for the server to record every final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            by_stage = {run.name.removeprefix("stage:").rsplit("-", 1)[0]: run for run in runs}
            if set(by_stage) == expected and all(r.state and r.state.is_final() for r in by_stage.values()):
                return {stage: (run, sorted(client.read_task_run_states(run.id), key=lambda s: s.timestamp))
                        for stage, run in by_stage.items()}
            assert time.monotonic() < deadline, f"task runs {sorted(by_stage)} not all final"
            time.sleep(1)


def running_interval(states) -> tuple:
    """From the first Running state (the accelerator slot is held from just before it) to the final state."""
    start = next(s.timestamp for s in states if s.type.value == "RUNNING")
    return start, states[-1].timestamp


@pytest.mark.slow
def test_served_deployment_retries_a_crash_and_keeps_accelerator_stages_apart(served, ops_workspace):
    from prefect.client.orchestration import get_client

    finished = wait_for_final(served.trained.id)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    out = ops_workspace / "data/out/ops"
    assert all((out / stage / "manifest.json").is_file() for stage in TRAINED)
    assert not (out / "eval_data").exists()  # the run's parameter override left it out
    assert finished.parameters["recipe_path"] == str(ops_workspace / "recipe.yaml")
    # the served flow object carried its task runner into the run's process
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in served.log.read_text()

    stages = stage_task_runs(served.trained.id, set(TRAINED))
    rl_run, rl_states = stages["rl"]
    assert served.crash_marker.is_file()  # the reward did kill the first attempt
    assert rl_run.run_count == 2 and any(s.name == "Retrying" for s in rl_states)
    assert "tunegraph:accelerator" in rl_run.tags and "tunegraph:accelerator" in stages["sft"][0].tags
    assert "tunegraph:accelerator" not in stages["base"][0].tags

    # two Dask workers let sft and rl start together; the tag limit runs them one after the other
    (sft_start, sft_end), (rl_start, rl_end) = running_interval(stages["sft"][1]), running_interval(rl_states)
    assert sft_end <= rl_start or rl_end <= sft_start
    # the two data stages, both ready at once, do run at the same time
    (base_start, base_end), (data_start, data_end) = (running_interval(stages["base"][1]),
                                                      running_interval(stages["train_data"][1]))
    assert max(base_start, data_start) < min(base_end, data_end)

    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("tunegraph:accelerator").concurrency_limit == 1


@pytest.mark.slow
def test_failing_stage_fails_the_served_run_with_the_stage_named(served, ops_workspace):
    finished = wait_for_final(served.failing.id)
    assert finished.state.type.value == "FAILED"
    assert "stage 'train_data'" in finished.state.message and "bad.jsonl:3" in finished.state.message
    assert not (ops_workspace / "data/out/ops_bad/train_data").exists()


@pytest.mark.slow
def test_no_serve_registers_for_a_worker_that_runs_it(prefect_api, ops_workspace, model_cache, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    env = deploy_env(prefect_api, tmp_path / "home", model_cache)
    registered = subprocess.run([TUNEGRAPH, "deploy", "recipe.yaml", "--no-serve", "--pool", "test-pool", "--name",
                                 "nightly", "--cron", "0 3 1 1 *", "--param", "only=[eval_data]"],
                                cwd=ops_workspace, env=env, capture_output=True, text=True, timeout=300)
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert "prefect worker start --pool test-pool" in registered.stdout
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("tunegraph-recipe/nightly")
    assert deployment.work_pool_name == "test-pool"
    assert deployment.entrypoint == "tunegraph.flows.recipe_flow.recipe_flow"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 1 1 *"]
    assert deployment.parameters["only"] == ["eval_data"]

    flow_run = run_deployment("tunegraph-recipe/nightly", timeout=0)
    worker = subprocess.run([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "test-pool",
                             "--run-once"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finished = wait_for_final(flow_run.id, timeout_s=120)
    assert finished.state.type.value == "COMPLETED", f"{finished.state.message}\n{worker.stdout[-3000:]}"
    assert (ops_workspace / "data/out/ops/eval_data/manifest.json").is_file()


def test_deploy_needs_a_reachable_prefect_server(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws")
    home = str(tmp_path / "home")  # no profile that could name a server
    unset = subprocess.run([TUNEGRAPH, "deploy", "recipe.yaml"], cwd=ws, env=cli_env(PREFECT_HOME=home),
                           capture_output=True, text=True, timeout=300)
    assert unset.returncode == 2
    assert unset.stderr.strip().splitlines()[-1].startswith("error: PREFECT_API_URL is not set")
    assert "prefect server start" in unset.stderr
    url = f"http://127.0.0.1:{unused_port()}/api"
    unreachable = subprocess.run([TUNEGRAPH, "deploy", "recipe.yaml"], cwd=ws,
                                 env=cli_env(PREFECT_HOME=home, PREFECT_API_URL=url),
                                 capture_output=True, text=True, timeout=300)
    assert unreachable.returncode == 2
    last = unreachable.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the Prefect API at {url}") and "prefect server start" in last


def test_param_overrides_are_yaml_and_checked():
    from tunegraph.errors import TunegraphError
    from tunegraph.flows.deploy import parse_param_overrides

    assert parse_param_overrides(["force=true", "only=[sft, eval]"]) == {"force": True, "only": ["sft", "eval"]}
    assert parse_param_overrides(["only=sft"]) == {"only": ["sft"]}
    with pytest.raises(TunegraphError, match="did you mean 'force'"):
        parse_param_overrides(["forse=true"])
    with pytest.raises(TunegraphError, match="KEY=VALUE"):
        parse_param_overrides(["force"])


def test_training_and_model_reading_stages_carry_the_accelerator_tag(tmp_path):
    from tunegraph.flows.accelerator import ACCELERATOR_TAG, stage_tags
    from tunegraph.recipe import load_recipe

    recipe = load_recipe(make_tiny_workspace(tmp_path / "ws") / "recipe.yaml")
    tagged = {name for name, stage in recipe.stages.items() if ACCELERATOR_TAG in stage_tags(stage)}
    assert tagged == {"sft", "eval_sft"}  # training, and evaluation (greedy generation on the model)
    assert stage_tags(recipe.stages["base"]) == ["tunegraph:import_model"]
