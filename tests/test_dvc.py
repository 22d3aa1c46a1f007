"""DVC round trip: `dvc repro` of the generated dvc.yaml gives the artifacts `tunegraph run` gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, make_tiny_workspace, run_cli
from tunegraph.dvcgen import check_dvc_yaml, render_dvc_yaml
from tunegraph.recipe import load_recipe


def sh(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result.stdout


def manifests(workspace: Path) -> dict[str, dict]:
    root = workspace / "data/out/tiny"
    return {p.name: json.loads((p / "manifest.json").read_text()) for p in sorted(root.iterdir())
            if (p / "manifest.json").is_file()}


def dvc_bin() -> str:
    return str(Path(sys.executable).parent / "dvc")


@pytest.mark.slow
def test_dvc_repro_reproduces_tunegraph_run_byte_for_byte(tmp_path):
    flow_ws = make_tiny_workspace(tmp_path / "flow")
    run_cli(["run", "recipe.yaml"], cwd=flow_ws)

    dvc_ws = make_tiny_workspace(tmp_path / "dvc")
    sh(["git", "init", "-q"], dvc_ws)
    sh([dvc_bin(), "init", "-q"], dvc_ws)
    run_cli(["dvc", "recipe.yaml"], cwd=dvc_ws)
    sh([dvc_bin(), "repro"], dvc_ws)

    ran, reproduced = manifests(flow_ws), manifests(dvc_ws)
    assert set(ran) == {"base", "train_data", "eval_data", "sft", "eval_sft"}
    for stage in ran:  # the whole manifest: fingerprint, per-file hashes, content hash
        assert reproduced[stage] == ran[stage], stage
    for stage in ran:  # and the bytes of every file, manifest included
        for rel in list(ran[stage]["files"]) + ["manifest.json"]:
            a = (flow_ws / "data/out/tiny" / stage / rel).read_bytes()
            assert a == (dvc_ws / "data/out/tiny" / stage / rel).read_bytes(), f"{stage}/{rel}"

    status = sh([dvc_bin(), "status"], dvc_ws)
    assert "up to date" in status.lower() or status.strip() == "", status
    # a cached `tunegraph run` over the DVC-produced artifacts runs nothing
    again = run_cli(["run", "recipe.yaml"], cwd=dvc_ws)
    assert " ran " not in again.stdout


def test_generated_dvc_yaml_declares_deps_params_outs_metrics(tiny_workspace):
    recipe = load_recipe(tiny_workspace / "recipe.yaml")
    import yaml

    stages = yaml.safe_load(render_dvc_yaml([recipe], tiny_workspace))["stages"]
    sft = stages["tiny-sft"]
    assert sft["cmd"] == "tunegraph stage recipe.yaml sft"
    assert "data/out/tiny/base" in sft["deps"] and "data/out/tiny/train_data" in sft["deps"]
    assert sft["outs"] == ["data/out/tiny/sft"]
    assert sft["metrics"] == [{"data/out/tiny/metrics/sft.json": {"cache": False}}]
    assert sft["params"] == [{"recipe.yaml": ["seed", "threads", "stages.sft"]}]
    assert "train.jsonl" in stages["tiny-train_data"]["deps"]
    assert "base_model" in stages["tiny-base"]["params"][0]["recipe.yaml"]


def test_committed_dvc_yaml_is_in_sync_with_the_quickstart_recipe():
    recipe = load_recipe(REPO / "recipes/quickstart.yaml")
    recipe = type(recipe)(Path("recipes/quickstart.yaml"), recipe.spec, recipe.stages, recipe.order)
    stale = check_dvc_yaml([recipe], REPO, REPO / "dvc.yaml")
    assert stale == "", f"dvc.yaml is stale ({stale}): run `tunegraph dvc recipes/quickstart.yaml`"
