"""Fingerprints and manifests: what makes a stage's output what it is.

fingerprint = sha256 over (stage kind, params, upstream content hashes, hashes of the workspace
files the params name, the stage's code version, seed, torch thread count). Equal fingerprints
mean the stage would produce byte-identical output, so a stored artifact with that fingerprint
is reused. The manifest written beside the artifact records all of it, plus the per-file
content hashes and library versions: it is the lineage. It holds no timestamps, so it is
itself reproducible byte for byte.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tunegraph.code_version import code_version
from tunegraph.errors import StageError
from tunegraph.hashing import MANIFEST_NAME, canonical_json, file_hashes, hash_json, hash_path, tree_hash
from tunegraph.recipe import Recipe

MANIFEST_VERSION = 1
TRACKED_LIBRARIES = ("tunegraph", "torch", "transformers", "peft", "accelerate", "bitsandbytes",
                     "safetensors", "tokenizers", "gguf", "mergekit", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(artifact: Path) -> dict | None:
    path = artifact / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


@dataclass(frozen=True)
class StagePlan:
    """Everything known about a stage before it runs."""

    name: str
    kind: str
    out_dir: Path
    metrics_path: Path
    inputs: dict[str, Path | dict[str, Path]]  # slot -> upstream artifact directory ({stage: dir} for many)
    upstream: dict[str, dict]  # slot (``slot.i`` for the i-th of a many slot) -> {"stage", "content_hash"}
    input_files: dict[str, str]  # workspace path -> content hash
    params: dict
    source: str  # identity of an external source, e.g. a packaged model's version
    seed: int
    threads: int
    code_version: str
    processes: int = 1  # data-parallel processes: their gradient averaging changes the numerics

    @property
    def fingerprint(self) -> str:
        return hash_json({
            "kind": self.kind,
            "params": self.params,
            "upstream": {slot: up["content_hash"] for slot, up in self.upstream.items()},
            "input_files": self.input_files,
            "code_version": self.code_version,
            "seed": self.seed,
            "threads": self.threads,
            "source": self.source,
            # only when >1, so single-process fingerprints stay what they were
            **({"processes": self.processes} if self.processes != 1 else {}),
        })


def artifact_dir(recipe: Recipe, workspace: Path, stage: str) -> Path:
    return recipe.output_root(workspace) / stage


def metrics_path(recipe: Recipe, workspace: Path, stage: str) -> Path:
    # Outside the artifact dir: DVC forbids a metrics file inside another output.
    return recipe.output_root(workspace) / "metrics" / f"{stage}.json"


def plan_stage(recipe: Recipe, workspace: Path, name: str) -> StagePlan:
    """Resolve a stage's inputs and fingerprint; upstream artifacts must already exist."""
    stage = recipe.stages[name]
    inputs, upstream = {}, {}
    for slot, listed in stage.spec.inputs.items():
        many = stage.kind.slot(slot).many
        parents = [listed] if isinstance(listed, str) else listed
        # The i-th stage of a many slot enters the lineage as ``slot.i``: the order is part of the
        # fingerprint (a SLERP from a to b is not one from b to a), and each key stays one stage.
        keys = [f"{slot}.{i}" for i in range(len(parents))] if many else [slot]
        for key, parent in zip(keys, parents):
            upstream[key] = {"stage": parent, "content_hash": _upstream_hash(recipe, workspace, name, parent)}
        dirs = {parent: artifact_dir(recipe, workspace, parent) for parent in parents}
        inputs[slot] = dirs if many else dirs[parents[0]]
    input_files = {}
    for rel in stage.params.input_files():
        path = Path(rel) if Path(rel).is_absolute() else workspace / rel
        if not path.exists():
            raise StageError(f"{recipe.path}: stage {name!r}: input file {rel} does not exist (paths are relative "
                             f"to the workspace {workspace})")
        input_files[rel] = hash_path(path)
    return StagePlan(
        name=name, kind=stage.kind.name,
        out_dir=artifact_dir(recipe, workspace, name), metrics_path=metrics_path(recipe, workspace, name),
        inputs=inputs, upstream=upstream, input_files=input_files,
        params=stage.params.fingerprint_params(), source=stage.params.source_identity(),
        seed=recipe.spec.seed, threads=recipe.spec.threads, code_version=code_version(stage.kind.module),
        processes=stage.spec.processes,
    )


def _upstream_hash(recipe: Recipe, workspace: Path, name: str, parent: str) -> str:
    parent_dir = artifact_dir(recipe, workspace, parent)
    manifest = read_manifest(parent_dir)
    if manifest is None:
        raise StageError(f"stage {name!r} needs the output of stage {parent!r} at {parent_dir}, which is "
                         f"missing: run `tunegraph run {recipe.path}` (or include {parent!r} in --only)")
    return manifest["content_hash"]


def build_manifest(plan: StagePlan, artifact_type: str, root: Path) -> dict:
    files = file_hashes(root)
    return {
        "manifest_version": MANIFEST_VERSION,
        "stage": plan.name,
        "kind": plan.kind,
        "artifact_type": artifact_type,
        "fingerprint": plan.fingerprint,
        "content_hash": tree_hash(files),
        "files": files,
        "params": plan.params,
        "upstream": plan.upstream,
        "input_files": plan.input_files,
        "source": plan.source,
        "code_version": plan.code_version,
        "seed": plan.seed,
        "threads": plan.threads,
        "libraries": library_versions(),
    }


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(json.loads(canonical_json(value)), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_cached(plan: StagePlan) -> bool:
    """True when the stored artifact has this fingerprint and its files are all present."""
    manifest = read_manifest(plan.out_dir)
    if manifest is None or manifest.get("fingerprint") != plan.fingerprint or not plan.metrics_path.is_file():
        return False
    return all((plan.out_dir / rel).is_file() for rel in manifest.get("files", {}))
