"""`tunegraph init` scaffolds a git + DVC workspace; with a local-directory DVC remote, a fresh clone plus
`dvc pull` resumes the flow from the pushed artifacts without recomputing any stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, make_tiny_workspace, run_cli
from tunegraph.dvcgen import check_dvc_yaml
from tunegraph.errors import TunegraphError
from tunegraph.recipe import load_recipe
from tunegraph.scaffold import init_workspace

STAGES = ("base", "train_data", "eval_data", "sft", "eval_sft")
GIT_IDENTITY = ["-c", "user.name=tunegraph test", "-c", "user.email=test@tunegraph.invalid"]


def sh(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-2000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout


def dvc(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dvc"), *args]


def test_init_creates_a_git_and_dvc_workspace_whose_dvc_yaml_is_in_sync(tmp_path):
    result = run_cli(["init", "ws"], cwd=tmp_path)
    ws = tmp_path / "ws"
    assert (ws / ".git").is_dir() and (ws / ".dvc").is_dir()
    assert "analytics = false" in (ws / ".dvc/config").read_text()
    recipe = load_recipe(ws / "recipes/quickstart.yaml")
    for stage in recipe.stages.values():  # the data the recipe names came along
        for rel in stage.params.input_files():
            assert (ws / rel).is_file(), rel
    assert check_dvc_yaml([recipe], ws, ws / "dvc.yaml") == ""
    ignored = (ws / ".gitignore").read_text()
    assert ".tunegraph/" in ignored and "data/out/*/sweep/" in ignored
    assert "data/out\n" not in ignored  # artifacts are DVC's: it git-ignores each one itself
    for command in ("tunegraph run recipes/quickstart.yaml", "dvc commit", "dvc remote add -d", "dvc push",
                    "dvc pull"):
        assert command in result.stdout, command
    sh(["git", "status", "--porcelain"], ws)  # a git work tree


def test_init_refuses_a_non_empty_directory_and_an_unknown_recipe(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(TunegraphError, match=r"full is not empty \(it holds notes.txt\)"):
        init_workspace(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]  # untouched
    with pytest.raises(TunegraphError, match="no starter recipe named 'quikstart' \\(did you mean 'quickstart'"):
        init_workspace(tmp_path / "new", "quikstart")
    assert not (tmp_path / "new").exists()


def _stage_statuses(stdout: str) -> dict[str, str]:
    """stage -> status from the summary table `tunegraph run` prints."""
    statuses = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) >= 3 and cells[0] in STAGES:
            statuses[cells[0]] = cells[2]
    return statuses


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_artifacts_and_resumes_without_recomputing(tmp_path):
    run_cli(["init", "origin"], cwd=tmp_path)
    origin = make_tiny_workspace(tmp_path / "origin")  # the tiny recipe, to stay fast
    run_cli(["dvc", "recipe.yaml"], cwd=origin)
    first = run_cli(["run", "recipe.yaml"], cwd=origin)
    assert _stage_statuses(first.stdout) == dict.fromkeys(STAGES, "ran")
    assert list((origin / ".tunegraph/reports").glob("*.html"))  # the run's report, kept out of git

    # the commands docs/operations-dvc.md gives
    sh(dvc("commit", "-f"), origin)
    sh(["git", "add", "-A"], origin)
    sh(["git", *GIT_IDENTITY, "commit", "-q", "-m", "first run"], origin)
    sh(dvc("remote", "add", "-d", "storage", str(tmp_path / "remote")), origin)
    sh(["git", *GIT_IDENTITY, "commit", "-q", "-am", "DVC remote"], origin)
    sh(dvc("push"), origin)
    tracked = sh(["git", "ls-files"], origin).split()
    assert "dvc.lock" in tracked and "data/out/tiny/metrics/sft.json" in tracked
    assert not any(path.startswith(("data/out/tiny/sft/", ".tunegraph/")) for path in tracked)  # weights: DVC

    sh(["git", "clone", "-q", str(origin), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    assert not (clone / "data/out/tiny/sft").exists()
    sh(dvc("pull"), clone)
    assert "up to date" in sh(dvc("status"), clone).lower()

    again = run_cli(["run", "recipe.yaml"], cwd=clone)
    statuses = _stage_statuses(again.stdout)
    if statuses != dict.fromkeys(STAGES, "cached"):  # say why: a fingerprint input changed between the runs
        ran = [s for s, status in statuses.items() if status != "cached"]
        before = json.loads((origin / f"data/out/tiny/{ran[0]}/manifest.json").read_text())
        after = json.loads((clone / f"data/out/tiny/{ran[0]}/manifest.json").read_text())
        changed = sorted(k for k in before if before[k] != after.get(k))
        pytest.fail(f"stages {ran} ran again in the clone; their manifests differ in {changed} "
                    f"(code_version: tunegraph's source changed during the test)")
    assert "up to date" in sh(dvc("status"), clone).lower()
