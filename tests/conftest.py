"""Shared fixtures: a tiny workspace (tiny model, a few quickstart rows) and CLI helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Triton kernels run in the CPU interpreter here (no GPU); the flag must be set before any
# @triton.jit kernel module is imported, so it is set at collection time.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = """\
name: tiny
base_model: tiny:llama
seed: 11
threads: 2
stages:
  base:
    uses: import_model
  train_data:
    uses: load_dataset
    params: {path: train.jsonl}
  eval_data:
    uses: load_dataset
    params: {path: eval.jsonl}
  sft:
    uses: sft
    inputs: {model: base, dataset: train_data}
    params: {strategy: lora, max_steps: 2, batch_size: 4, learning_rate: 1.0e-3}
  eval_sft:
    uses: evaluate
    inputs: {model: sft, dataset: eval_data}
    params: {max_new_tokens: 4, limit: 4}
"""


def make_tiny_workspace(root: Path, recipe_text: str = TINY_RECIPE) -> Path:
    """A workspace with a tiny-model recipe and 12 train / 4 eval rows of the quickstart data."""
    root.mkdir(parents=True, exist_ok=True)
    train = (REPO / "data/quickstart/train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:12]
    evals = (REPO / "data/quickstart/eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]
    (root / "train.jsonl").write_text("".join(train), encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(evals), encoding="utf-8")
    (root / "recipe.yaml").write_text(textwrap.dedent(recipe_text), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def model_cache(request, tmp_path_factory) -> Path:
    """One model cache for the whole session (and, via pytest's cache dir, across sessions).

    Conversions are deterministic, so reusing them across sessions is safe; set
    TUNEGRAPH_TEST_CACHE to point the tests at another directory.
    """
    if os.environ.get("TUNEGRAPH_TEST_CACHE"):
        return Path(os.environ["TUNEGRAPH_TEST_CACHE"])
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("tunegraph-models")) if cache is not None else tmp_path_factory.mktemp("tunegraph-cache")


@pytest.fixture(autouse=True)
def _use_model_cache(model_cache, monkeypatch):
    """Every test, and every CLI it starts (cli_env copies os.environ), shares the model cache."""
    monkeypatch.setenv("TUNEGRAPH_CACHE", str(model_cache))


@pytest.fixture
def tiny_workspace(tmp_path) -> Path:
    return make_tiny_workspace(tmp_path / "ws")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a user would have: the venv's bin on PATH, no inherited tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``tunegraph`` entry point as a user would."""
    exe = shutil.which("tunegraph", path=str(Path(sys.executable).parent)) or "tunegraph"
    result = subprocess.run([exe, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"tunegraph {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


def stage_ctx(workspace: Path, name: str = "t") -> "StageContext":
    """A stage context as the runner makes one (seeded, 2 threads), for calling stages directly."""
    from tunegraph.context import StageContext, seed_everything

    seed_everything(5, 2)
    return StageContext(stage=name, seed=5, threads=2, workspace=workspace)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, model_cache) -> Path:
    """model/ (tiny llama), train/ (16 chat rows), eval/ (6), pairs/ (16 preference pairs), unpaired/ (16)."""
    import json

    from tunegraph.tasks.import_model import ImportModelParams, import_model
    from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset

    os.environ["TUNEGRAPH_CACHE"] = str(model_cache)
    root = tmp_path_factory.mktemp("artifacts")
    (root / "model").mkdir()
    import_model(ImportModelParams(model="tiny:llama"), {}, root / "model", stage_ctx(root))
    train = [json.loads(line) for line in (REPO / "data/quickstart/train.jsonl").read_text().splitlines()[:16]]
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": train[(i + 3) % 16]["output"]}
             for i, r in enumerate(train)]
    unpaired = [{"prompt": r["instruction"], "completion": r["output"] if i % 2 else train[(i + 3) % 16]["output"],
                 "label": bool(i % 2)} for i, r in enumerate(train)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "unpaired.jsonl").write_text("".join(json.dumps(p) + "\n" for p in unpaired))
    sources = (("train", str(REPO / "data/quickstart/train.jsonl"), 16), ("eval", str(REPO / "data/quickstart/eval.jsonl"), 6),
               ("pairs", str(root / "pairs.jsonl"), None), ("unpaired", str(root / "unpaired.jsonl"), None))
    for name, path, limit in sources:
        (root / name).mkdir()
        load_dataset(LoadDatasetParams(path=path, limit=limit), {}, root / name, stage_ctx(root))
    return root


@pytest.fixture(scope="module")
def reward_model_dir(tiny_artifacts, tmp_path_factory) -> Path:
    """A reward model artifact (one LoRA step of the reward_model stage on the tiny model's pairs), which PPO scores with."""
    from tunegraph.registry import all_kinds

    out = tmp_path_factory.mktemp("reward_model")
    kind = all_kinds()["reward_model"]
    kind.fn(kind.params_model(max_steps=1, batch_size=4, max_length=128),
            {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "pairs"}, out, stage_ctx(out, "rm"))
    return out
