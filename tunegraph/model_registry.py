"""Shippable stage outputs as versions in the MLflow model registry, tagged with their lineage.

Which stages register: ``export_gguf`` and ``quantize_bnb`` (the forms a model ships in) unless their
recipe entry says ``register: false``; any other model-producing stage (sft, merge, ...) when its entry
says ``register: true``. The registered model is ``<recipe>-<stage>``, or the name ``register: NAME``
gives.

A version is created only for a content hash the registered model does not hold yet, so a cached
re-run adds none and a changed artifact adds one. Its source is ``runs:/<stage run>/model``: the
stage run gets the artifact's ``manifest.json`` (every file's sha256, the full lineage) and its small
files (configs, model card, Modelfiles, reports) under ``model/``. The weights stay where DVC keeps them
(the path is the version's ``tunegraph.artifact`` tag): copying hundreds of MB into the MLflow artifact
store would duplicate them, and a ``file://`` source would point at a directory that the next run of the
stage replaces in place. A ``runs:/`` source whose run is the version's run is also what an MLflow
tracking server accepts; it refuses local paths outside the run's artifact directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunegraph.errors import StageError
from tunegraph.hashing import MANIFEST_NAME
from tunegraph.lineage import artifact_dir, read_manifest

SHIPPED_KINDS = ("export_gguf", "quantize_bnb")  # registered unless the recipe says ``register: false``
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
ARTIFACT_PATH = "model"
_POINTER_SUFFIXES = (".json", ".md", ".Modelfile", ".yml", ".yaml", ".txt")
_MAX_POINTER_BYTES = 2**20
_MAX_METRIC_TAGS = 50
_MAX_TAG_CHARS = 5000


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    created: bool  # False: this content hash was registered before


def registered_name(recipe, stage_name: str) -> str | None:
    """The registered model a stage's output goes to, or None when the stage is not registered."""
    stage = recipe.stages[stage_name]
    register = stage.spec.register_as
    if register is None:
        register = stage.kind.name in SHIPPED_KINDS
    if register is False:
        return None
    return register if isinstance(register, str) else f"{recipe.name}-{stage_name}"


def check_register(kind, register: bool | str | None) -> str | None:
    """Why a stage entry's ``register:`` is wrong (a one-line reason), or None when it is fine."""
    if register is None or register is False:
        return None
    if kind.produces != "model" and kind.name not in SHIPPED_KINDS:
        return (f"register needs a stage that produces a model, and {kind.name} produces a {kind.produces} "
                f"(remove register)")
    if isinstance(register, str) and not MODEL_NAME.match(register):
        return (f"register: {register!r} is not a registered model name: use letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit")
    return None


def pointer_files(artifact: Path) -> list[Path]:
    """The manifest and the small top-level files of an artifact, logged as the version's ``model/``."""
    files = [artifact / MANIFEST_NAME]
    files += sorted(p for p in artifact.iterdir() if p.is_file() and p.name != MANIFEST_NAME
                    and (p.suffix in _POINTER_SUFFIXES or p.name == "Modelfile")
                    and p.stat().st_size <= _MAX_POINTER_BYTES)
    return files


def version_tags(recipe, plan, outcome, workspace: Path, commit: str) -> dict[str, str]:
    """Lineage tags of a model version: identity, upstream and ancestor hashes, code, key metrics."""
    stage = recipe.stages[plan.name]
    tags = {
        "tunegraph.recipe": recipe.name,
        "tunegraph.stage": plan.name,
        "tunegraph.kind": plan.kind,
        "tunegraph.fingerprint": plan.fingerprint,
        "tunegraph.content_hash": outcome.content_hash,
        "tunegraph.code_version": plan.code_version,
        "tunegraph.base_model": recipe.spec.base_model,
        "tunegraph.artifact": str(Path(outcome.path).resolve()),
        "tunegraph.git_commit": commit,
    }
    for slot, up in plan.upstream.items():
        tags[f"tunegraph.upstream.{slot}"] = f"{up['stage']}@{up['content_hash']}"
    ancestors = [name for name in recipe.order if name in recipe.ancestors(plan.name)]
    chain = []
    for name in ancestors:
        manifest = read_manifest(artifact_dir(recipe, workspace, name)) or {}
        chain.append(f"{name}@{manifest.get('content_hash', '?')[:12]}")
    if chain:
        tags["tunegraph.ancestors"] = " ".join(chain)[:_MAX_TAG_CHARS]
    key = [m for m in stage.kind.summary_metrics if m in outcome.metrics]
    rest = sorted(m for m in outcome.metrics if m not in key)
    for metric in (key + rest)[:_MAX_METRIC_TAGS]:
        tags[f"tunegraph.metric.{metric}"] = format(float(outcome.metrics[metric]), ".6g")
    return tags


def register_stage_model(client, run_id: str, recipe, plan, outcome, workspace: Path,
                         commit: str) -> Registered | None:
    """Register the stage's output (see the module docstring); None when the stage is not registered."""
    from mlflow.exceptions import MlflowException

    name = registered_name(recipe, plan.name)
    if name is None or not outcome.content_hash:
        return None
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.`tunegraph.content_hash` = '{outcome.content_hash}'")
        if found:
            version = min(found, key=lambda v: int(v.version))
            client.set_tag(run_id, "tunegraph.registered_model", f"{name}/{version.version}")
            return Registered(name, str(version.version), created=False)
        _ensure_registered_model(client, name, recipe, plan.name)
        for path in pointer_files(Path(outcome.path)):
            client.log_artifact(run_id, str(path), ARTIFACT_PATH)
        description = (f"{plan.kind} stage {plan.name!r} of recipe {recipe.name!r}; files at "
                       f"{Path(outcome.path).resolve()} (DVC-tracked), lineage in {ARTIFACT_PATH}/{MANIFEST_NAME}")
        version = client.create_model_version(name, f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id,
                                               tags=version_tags(recipe, plan, outcome, workspace, commit),
                                               description=description)
        client.set_tag(run_id, "tunegraph.registered_model", f"{name}/{version.version}")
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"stage {plan.name!r}: registering model {name!r} in MLflow failed: {first}") from None
    return Registered(name, str(version.version), created=True)


def _ensure_registered_model(client, name: str, recipe, stage_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, tags={"tunegraph.recipe": recipe.name, "tunegraph.stage": stage_name},
                                       description=f"stage {stage_name!r} of tunegraph recipe {recipe.name!r}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a concurrent stage created it first
            raise
