"""`tunegraph run --dask`: a recipe's stages on a local Dask cluster, and on an existing one started by the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, make_tiny_workspace
from prefect_server import prefect_server, stop, unused_port

TUNEGRAPH = str(Path(sys.executable).parent / "tunegraph")
BIN = Path(sys.executable).parent


def run_tunegraph(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNEGRAPH, *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.slow
def test_run_on_a_local_dask_cluster(tmp_path, model_cache):
    ws = make_tiny_workspace(tmp_path / "ws")
    stages = ["base", "train_data", "sft"]  # sft waits for the other two: dependencies cross Dask futures
    # Prefect's console log at INFO (tunegraph quiets it by default) shows which task runner ran the stages
    result = run_tunegraph(["run", "recipe.yaml", "--dask", "--parallel", "2", *(f"--only={s}" for s in stages)],
                           ws, TUNEGRAPH_CACHE=str(model_cache), PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="INFO")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stages run on a local Dask cluster (2 workers, 1 thread each)" in result.stderr
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in result.stderr
    produced = sorted(p.name for p in (ws / "data/out/tiny").iterdir() if (p / "manifest.json").is_file())
    assert produced == sorted(stages)


@pytest.mark.slow
def test_run_on_an_existing_dask_cluster(tmp_path, model_cache):
    """A scheduler and a worker started as their own processes, as on a real cluster; the stages' output
    shows up in the worker's log, since each stage's child process runs where the worker is."""
    from distributed import Client

    ws = make_tiny_workspace(tmp_path / "ws")
    address = f"tcp://127.0.0.1:{unused_port()}"
    (tmp_path / "server").mkdir()
    with prefect_server(tmp_path / "server") as api_url:
        scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                      address.rsplit(":", 1)[1], "--no-dashboard"], env=cli_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker_log = tmp_path / "worker.log"
        with worker_log.open("w") as out:
            worker = subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
                                      cwd=tmp_path, env=cli_env(TUNEGRAPH_CACHE=str(model_cache)), stdout=out,
                                      stderr=subprocess.STDOUT)
        try:
            with Client(address, timeout=120) as client:
                client.wait_for_workers(1, timeout=120)
            result = run_tunegraph(["run", "recipe.yaml", "--dask", address, "--only", "base", "--only", "train_data"],
                                   ws, PREFECT_API_URL=api_url, PREFECT_HOME=str(tmp_path / "home"))
        finally:
            stop(worker)
            stop(scheduler)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"stages run on the Dask cluster at {address}" in result.stderr
    assert all((ws / "data/out/tiny" / stage / "manifest.json").is_file() for stage in ("base", "train_data"))
    worker_output = worker_log.read_text()
    assert "[train_data] ran in" in worker_output and "[base] ran in" in worker_output
    assert "[train_data] ran in" not in result.stderr


def test_an_existing_cluster_needs_a_prefect_server(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws")
    result = run_tunegraph(["run", "recipe.yaml", "--dask", "tcp://127.0.0.1:8786"], ws,
                           PREFECT_HOME=str(tmp_path / "home"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --dask tcp://127.0.0.1:8786: the cluster's workers need a Prefect server")
    assert "prefect server start" in last
