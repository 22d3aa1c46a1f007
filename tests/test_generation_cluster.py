"""Data-generation batches on a real Dask cluster (a scheduler and two workers started as processes):
the same dataset as in one process, the work done on the workers, a dead cluster named in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, stage_ctx
from prefect_server import stop, unused_port
from test_synth_stages import FAST, run
from tunegraph.errors import StageError
from tunegraph.generation_cluster import DASK_ADDRESS_ENV, _client
from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset
from tunegraph.tasks.self_instruct import SelfInstructParams, self_instruct

BIN = Path(sys.executable).parent
PARAMS = dict(calls_per_round=4, instructions_per_call=2, rounds=1, min_words=1, max_words=400, responses=2,
              teacher={"batch_size": 2}, **FAST)


def seed_rows(tmp_path: Path, limit: int) -> Path:
    out = tmp_path / "seeds"
    out.mkdir()
    load_dataset(LoadDatasetParams(path=str(REPO / "data/seeds/instructions.jsonl"), limit=limit), {}, out,
                 stage_ctx(tmp_path))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_cache):
    from distributed import Client

    address = f"tcp://127.0.0.1:{unused_port()}"
    logs = tmp_path_factory.mktemp("dask")
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                  address.rsplit(":", 1)[1], "--no-dashboard"], env=cli_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
                                cwd=logs, env=cli_env(TUNEGRAPH_CACHE=str(model_cache)),
                                stdout=(logs / f"worker{i}.log").open("w"), stderr=subprocess.STDOUT)
               for i in range(2)]
    try:
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
            yield address, client
    finally:
        for process in (*workers, scheduler):
            stop(process)


def test_batches_on_the_cluster_give_the_single_process_dataset(cluster, tiny_artifacts, tmp_path, monkeypatch):
    address, client = cluster
    seeds = seed_rows(tmp_path, 8)
    params = SelfInstructParams(**PARAMS)
    inputs = {"dataset": seeds, "teacher": tiny_artifacts / "model"}
    local = run(self_instruct, params, inputs, tmp_path / "local")

    monkeypatch.setenv(DASK_ADDRESS_ENV, address)
    _client.cache_clear()
    spread = run(self_instruct, params, inputs, tmp_path / "cluster")
    assert (tmp_path / "cluster/data.jsonl").read_bytes() == (tmp_path / "local/data.jsonl").read_bytes()
    assert spread.metrics == local.metrics and local.metrics["rows"] > 0

    def backends_loaded() -> int:
        from tunegraph.generation_cluster import _WORKER_BACKENDS

        return len(_WORKER_BACKENDS)

    per_worker = client.run(backends_loaded)
    assert sum(per_worker.values()) >= 1  # the model was loaded (and the chunks answered) on the workers
    _client.cache_clear()


def test_an_unreachable_scheduler_fails_the_stage_in_one_line(tiny_artifacts, tmp_path, monkeypatch):
    seeds = seed_rows(tmp_path, 4)
    monkeypatch.setenv(DASK_ADDRESS_ENV, f"tcp://127.0.0.1:{unused_port()}")
    monkeypatch.setattr("tunegraph.generation_cluster.CONNECT_TIMEOUT_S", 2)
    _client.cache_clear()
    with pytest.raises(StageError, match=f"{DASK_ADDRESS_ENV}=tcp://127.0.0.1:.*cannot reach the Dask scheduler"):
        run(self_instruct, SelfInstructParams(**PARAMS), {"dataset": seeds, "teacher": tiny_artifacts / "model"},
            tmp_path / "out")
    _client.cache_clear()


def test_a_stage_started_from_a_dask_worker_gets_that_cluster(cluster, monkeypatch):
    """What `tunegraph run --dask ADDRESS` relies on: the task on the worker hands its scheduler's address
    to the stage's child process; outside a worker nothing changes."""
    from tunegraph.generation_cluster import stage_environment

    address, client = cluster
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    assert stage_environment() is None
    env = client.submit(stage_environment, pure=False).result()
    assert env is not None and env[DASK_ADDRESS_ENV] == address and "PATH" in env
