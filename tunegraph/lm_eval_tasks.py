"""lm-evaluation-harness task files on local data: read, check, point at the workspace, clean the results.

A task file is an lm-eval task YAML whose dataset is a local file: ``dataset_path: json`` (or csv,
parquet, text, arrow) with ``dataset_kwargs: {data_files: ...}``. Relative data files resolve against
the tunegraph workspace. Everything here is plain YAML and dicts (no lm_eval import), so recipe
validation and fingerprinting stay cheap; :mod:`tunegraph.tasks.lm_eval` runs the harness.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from tunegraph.errors import StageError
from tunegraph.suggest import did_you_mean

# datasets' packaged loaders that read local files (anything else would need the hub).
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")
# Top-level keys of lm-eval's results that are the same on every run of the same inputs.
DETERMINISTIC_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                      "higher_is_better", "n-samples")


class _Loader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's ``!function module.name`` tag, kept as its text (resolved by lm-eval)."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_yaml(path: Path, _seen: frozenset[Path] = frozenset()) -> dict:
    """A task YAML as a dict, ``include:`` files merged in as lm-eval does (the including file's keys win).
    Raises :class:`ValueError` with a one-line reason (the caller names the stage and file)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"include cycle at {path}")
    if not path.is_file():
        raise ValueError("file not found")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ValueError(f"{line}invalid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not isinstance(config, dict):
        raise ValueError(f"a task file is a YAML mapping, got {type(config).__name__}")
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        included = Path(include) if Path(include).is_absolute() else path.parent / include
        merged.update(read_task_yaml(included, _seen | {path.resolve()}))
    return {**merged, **config}


def data_files(config: dict) -> list[str]:
    """The data files a task config names, as written (``data_files`` may be a string, a list or a
    split -> file(s) mapping)."""
    spec = (config.get("dataset_kwargs") or {}).get("data_files")
    values = spec.values() if isinstance(spec, dict) else [spec]
    files: list[str] = []
    for value in values:
        files += [str(v) for v in (value if isinstance(value, list) else [value]) if v]
    return files


def task_data_files(task_file: Path) -> list[str]:
    """The data files of a task file, or none when it cannot be read (the stage then reports why)."""
    try:
        return data_files(read_task_yaml(task_file))
    except (ValueError, OSError):
        return []


def check_config(config: dict, where: str, workspace: Path, known_metrics: set[str]) -> None:
    """Refuse, on one line naming ``where`` (stage and file), a task the harness cannot run offline here."""
    if "group" in config and "task" not in config:
        raise StageError(f"{where}: groups of tasks are not supported; list each task file under `tasks:`")
    if not isinstance(config.get("task"), str):
        raise StageError(f"{where}: no `task:` name (an lm-eval task file starts with `task: NAME`)")
    loader = config.get("dataset_path")
    if loader not in LOCAL_LOADERS:
        raise StageError(f"{where}: dataset_path {loader!r} is not a local file loader; this stage runs offline, "
                         f"so use one of {', '.join(LOCAL_LOADERS)} with dataset_kwargs: {{data_files: ...}}")
    files = data_files(config)
    if not files:
        raise StageError(f"{where}: dataset_path: {loader} needs dataset_kwargs: {{data_files: FILE}} "
                         f"(or a split -> file mapping), relative to the workspace")
    for name in files:
        if not resolve(name, workspace).is_file():
            raise StageError(f"{where}: data file {name} does not exist (relative to the workspace {workspace})")
    if config.get("process_results") is not None:
        return  # the task's own function computes its metrics
    for entry in config.get("metric_list") or []:
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if metric is None:
            raise StageError(f"{where}: every metric_list entry needs a `metric:` key")
        if entry.get("hf_evaluate"):
            raise StageError(f"{where}: metric {metric!r} uses hf_evaluate, which loads from the hub; "
                             f"this stage runs offline")
        if isinstance(metric, str) and not metric.startswith("!function") and metric not in known_metrics:
            raise StageError(f"{where}: unknown metric {metric!r}{did_you_mean(metric, known_metrics)}; "
                             f"lm-eval knows {', '.join(sorted(known_metrics))}")


def resolve(name: str, workspace: Path) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else workspace / path


def with_local_paths(config: dict, workspace: Path, cache_dir: Path) -> dict:
    """A copy of ``config`` whose data files are absolute and whose datasets cache is ``cache_dir``."""
    config = copy.deepcopy(config)
    kwargs = config["dataset_kwargs"]
    spec = kwargs["data_files"]

    def absolute(value):
        if isinstance(value, list):
            return [str(resolve(v, workspace)) for v in value]
        return str(resolve(value, workspace))

    kwargs["data_files"] = ({split: absolute(v) for split, v in spec.items()} if isinstance(spec, dict)
                            else absolute(spec))
    kwargs["cache_dir"] = str(cache_dir)
    return config


def clean_results(results: dict, configs: dict[str, dict], settings: dict) -> dict:
    """The run-independent part of lm-eval's output: no dates, durations, machine details or absolute
    paths; ``configs`` (task name -> the task file's config as written) replaces the rewritten ones."""
    cleaned = {key: results[key] for key in DETERMINISTIC_KEYS if key in results}
    cleaned["configs"] = {name: {**config, "dataset_kwargs": configs[name].get("dataset_kwargs")}
                          if name in configs else config for name, config in cleaned.get("configs", {}).items()}
    cleaned["settings"] = settings
    return cleaned


def stage_metrics(results: dict) -> dict[str, float]:
    """``<task>.<metric>`` (``<task>.<metric>.<filter>`` for a filter other than lm-eval's ``none``) for each
    numeric result; stderr entries keep their ``_stderr`` suffix. Task metrics come before stderrs."""
    values: dict[str, float] = {}
    for task, entries in results.get("results", {}).items():
        for key, value in entries.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample_len, "N/A" stderrs
            if math.isfinite(value):
                suffix = "" if filter_name == "none" else f".{filter_name}"
                values[f"{task}.{metric}{suffix}"] = float(value)
    return dict(sorted(values.items(), key=lambda item: ("_stderr" in item[0], item[0])))


def to_json(value) -> object:
    """``json.dumps(default=...)`` for lm-eval's objects: a function (a task's ``!function``) by its name,
    never its address or the absolute path lm-eval imports it from; anything else as ``str``."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"!function {value.__qualname__}"
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
