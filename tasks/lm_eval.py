"""Evaluate a model on lm-evaluation-harness tasks defined in local files, fully offline.

Each entry of ``tasks`` is an lm-eval task YAML in the workspace whose dataset is a local file
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``, relative to the workspace; see
``data/lm_eval/`` and :mod:`tunegraph.lm_eval_tasks`). The task files and their data files enter the
fingerprint and the DVC deps. The harness (``lm_eval.simple_evaluate``) scores the model artifact on CPU
through its HF model class, with the hub and datasets offline and the stage's seed for every RNG.

Outputs: ``results.json`` (lm-eval's results, configs, versions and sample counts, without dates,
durations, machine details or absolute paths, so the artifact is byte-reproducible) and
``samples.jsonl`` (one line per scored document). Metrics are ``<task>.<metric>`` (e.g.
``tunegraph_facts.acc``; ``<task>.<metric>.<filter>`` for a named filter) and their ``_stderr``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.lm_eval_tasks import (check_config, clean_results, read_task_yaml, stage_metrics, task_data_files,
                                     to_json, with_local_paths)
from tunegraph.params import InputFile, StageParams
from tunegraph.registry import InputSlot, StageResult, stage

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DISABLE_MULTIPROC": "1"}  # the last: lm-eval bootstraps stderrs in-process, not in a Pool


class LmEvalParams(StageParams):
    tasks: list[InputFile] = Field(min_length=1, description="lm-eval task YAML files (local data), relative to "
                                                             "the workspace")
    num_fewshot: int | None = Field(None, ge=0, description="examples before each prompt (default: each task's own, "
                                                           "else 0)")
    limit: int | None = Field(None, ge=1, description="score the first N documents of each task only")
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=8, description="context length (default: the model's)")
    bootstrap_iters: int = Field(1000, ge=0, description="bootstrap resamples for the stderr of non-mean metrics "
                                                         "(0: no stderrs)")
    apply_chat_template: bool = Field(False, description="wrap prompts in the model's chat template")

    def input_files(self) -> list[str]:
        """The task files and the data files they name (read from the current directory, the workspace
        when run as `tunegraph run`/`dvc repro`); an unreadable task file is reported by the stage."""
        files = list(self.tasks)
        for task in self.tasks:
            files += [name for name in task_data_files(Path(task).expanduser()) if name not in files]
        return files


@stage("lm_eval", params=LmEvalParams, produces="eval", inputs=(InputSlot("model", ("model",)),))
def lm_eval(params: LmEvalParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Score a model on local lm-eval tasks; metrics are lm-eval's, per task."""
    configs = _read_configs(params, ctx)
    with _offline(), tempfile.TemporaryDirectory(prefix="tunegraph-lm-eval-") as cache:
        from lm_eval import simple_evaluate

        lm = _harness_model(inputs["model"], params)
        tasks = _build_tasks(configs, ctx, Path(cache))
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=params.num_fewshot, limit=params.limit,
                                  bootstrap_iters=params.bootstrap_iters,
                                  apply_chat_template=params.apply_chat_template,
                                  log_samples=True, random_seed=ctx.seed, numpy_random_seed=ctx.seed,
                                  torch_random_seed=ctx.seed, fewshot_random_seed=ctx.seed)
    settings = {"lm_eval_version": _version(), "num_fewshot": params.num_fewshot, "limit": params.limit,
                "batch_size": params.batch_size, "max_length": params.max_length, "seed": ctx.seed,
                "bootstrap_iters": params.bootstrap_iters, "apply_chat_template": params.apply_chat_template,
                "task_files": {config["task"]: rel for rel, config in configs.items()}}
    cleaned = clean_results(results, {config["task"]: config for config in configs.values()}, settings)
    (out / RESULTS_FILE).write_text(json.dumps(cleaned, indent=2, sort_keys=True, default=to_json) + "\n",
                                    encoding="utf-8")
    with open(out / SAMPLES_FILE, "w", encoding="utf-8") as handle:
        for task in sorted(results.get("samples", {})):
            for sample in results["samples"][task]:
                handle.write(json.dumps({"task": task, **sample}, sort_keys=True, ensure_ascii=False,
                                        default=to_json) + "\n")
    return StageResult(metrics=stage_metrics(cleaned))


def _read_configs(params: LmEvalParams, ctx: StageContext) -> dict[str, dict]:
    """Each task file's config by its workspace path, checked: one-line errors naming stage and file."""
    import lm_eval.api.metrics  # noqa: F401 (registers the metrics)
    from lm_eval.api.registry import metric_registry

    known = set(metric_registry.keys())
    configs: dict[str, dict] = {}
    for rel in params.tasks:
        where = f"stage {ctx.stage!r}: {rel}"
        try:
            config = read_task_yaml(ctx.path(rel))
        except ValueError as exc:
            raise StageError(f"{where}: {exc}") from None
        check_config(config, where, ctx.workspace, known)
        clash = next((other for other, seen in configs.items() if seen["task"] == config["task"]), None)
        if clash:
            raise StageError(f"{where}: task name {config['task']!r} is also the task of {clash}")
        configs[rel] = config
    return configs


def _build_tasks(configs: dict[str, dict], ctx: StageContext, cache: Path) -> list:
    """lm-eval Task objects, built one file at a time so that a failure names its file. lm-eval's own
    loader reads each file again, to resolve ``!function`` tags against the file's folder."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = TaskManager(include_defaults=False)  # no scan of the thousands of built-in task files
    tasks = []
    for rel in configs:
        try:
            config = with_local_paths(load_yaml(ctx.path(rel)), ctx.workspace, cache)
            tasks += list(manager.load([config])["tasks"].values())
        except Exception as exc:  # the harness raises all kinds for a task it cannot build
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise StageError(f"stage {ctx.stage!r}: {rel}: lm-eval cannot build the task: {reason[:300]}") from None
    return tasks


def _harness_model(model_dir: Path, params: LmEvalParams):
    """lm-eval's HF model class around the artifact (with its adapter when ``requires_adapter.json`` says so)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from tunegraph.training.strategies import load_with_adapter

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_with_adapter(model_dir).eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=params.batch_size, max_length=params.max_length,
                device="cpu")


@contextmanager
def _offline():
    """Hub, datasets and transformers offline (environment and the flags datasets read at import)."""
    saved = {name: os.environ.get(name) for name in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    import datasets.config

    saved_flags = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved_flags
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")
