"""The stage runner: fingerprints, manifests, caching and atomic commits, in-process."""

import json
import textwrap

import pytest

from tunegraph.code_version import code_version, module_closure
from tunegraph.errors import DataError, StageError
from tunegraph.hashing import file_hashes, tree_hash
from tunegraph.lineage import plan_stage
from tunegraph.recipe import load_recipe
from tunegraph.runner import execute_stage

ROWS = [
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Say bye.", "output": "bye"},
]


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent("""\
        name: unit
        base_model: tiny:llama
        stages:
          data:
            uses: load_dataset
            params: {path: rows.jsonl}
          subset:
            uses: load_dataset
            params: {path: rows.jsonl, limit: 1}
    """))
    return tmp_path


def test_first_run_writes_manifest_with_lineage(workspace):
    recipe = load_recipe(workspace / "recipe.yaml")
    outcome = execute_stage(recipe, workspace, "data")
    assert outcome.status == "ran"
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["fingerprint"] == outcome.fingerprint
    assert manifest["files"] == file_hashes(outcome.path)
    assert manifest["content_hash"] == tree_hash(manifest["files"])
    assert manifest["params"]["path"] == "rows.jsonl"
    assert set(manifest["input_files"]) == {"rows.jsonl"}
    assert {"torch", "transformers", "python"} <= set(manifest["libraries"])
    assert manifest["seed"] == 0 and manifest["threads"] == 2
    assert json.loads((workspace / "data/out/unit/metrics/data.json").read_text())["rows"] == 2


def test_unchanged_stage_is_cached_and_changes_invalidate(workspace):
    recipe = load_recipe(workspace / "recipe.yaml")
    first = execute_stage(recipe, workspace, "data")
    assert execute_stage(recipe, workspace, "data").status == "cached"
    (workspace / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n")  # input file content changes
    again = execute_stage(recipe, workspace, "data")
    assert again.status == "ran" and again.fingerprint != first.fingerprint


def test_same_inputs_give_byte_identical_artifacts(workspace, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    for name in ("rows.jsonl", "recipe.yaml"):
        (other / name).write_bytes((workspace / name).read_bytes())
    a = execute_stage(load_recipe(workspace / "recipe.yaml"), workspace, "data")
    b = execute_stage(load_recipe(other / "recipe.yaml"), other, "data")
    assert file_hashes(a.path, exclude=()) == file_hashes(b.path, exclude=())


def test_failed_stage_keeps_previous_artifact_and_leaves_no_temp(workspace):
    recipe = load_recipe(workspace / "recipe.yaml")
    good = execute_stage(recipe, workspace, "data")
    before = file_hashes(good.path, exclude=())
    (workspace / "rows.jsonl").write_text('{"instruction": "x", "output": "y"}\n{broken\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2"):
        execute_stage(recipe, workspace, "data")
    assert file_hashes(good.path, exclude=()) == before
    leftovers = [p.name for p in good.path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_missing_upstream_is_a_clear_error(tmp_path):
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent("""\
        name: unit
        base_model: tiny:llama
        stages:
          data: {uses: load_dataset, params: {path: rows.jsonl}}
          score:
            uses: evaluate
            inputs: {model: base, dataset: data}
          base: {uses: import_model}
    """))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(StageError, match="needs the output of stage 'base'"):
        plan_stage(recipe, tmp_path, "score")


def test_code_version_follows_imports_into_helpers():
    modules = dict(module_closure("tunegraph.tasks.sft"))
    assert "tunegraph.training.loop" in modules  # a helper the stage calls
    assert "tunegraph.chat_data" in modules
    assert "tunegraph.runner" not in modules  # orchestration does not version stages
    assert code_version("tunegraph.tasks.sft") != code_version("tunegraph.tasks.load_dataset")
