"""Shippable stage outputs in the MLflow model registry: which stages, which tags, one version per content hash.

Against a real sqlite MLflow store. The fast tests commit artifacts the way the runner does (files,
then ``build_manifest``) and drive the :class:`Tracker` as ``tunegraph stage`` and the flow do; the
slow one runs a real flow through the CLI on the tiny model.
"""

from __future__ import annotations

import json
import textwrap

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import make_tiny_workspace, run_cli
from tunegraph.errors import RecipeError
from tunegraph.hashing import MANIFEST_NAME
from tunegraph.lineage import build_manifest, plan_stage, write_json
from tunegraph.model_registry import registered_name
from tunegraph.recipe import load_recipe
from tunegraph.runner import StageOutcome
from tunegraph.tracking import Tracker

RECIPE = """\
name: reg
base_model: tiny:llama
stages:
  base:
    uses: import_model
  gguf:
    uses: export_gguf
    inputs: {model: base}
  quant:
    uses: quantize_bnb
    inputs: {model: base}
    register: shipped-q4
  raw_q:
    uses: quantize_bnb
    inputs: {model: base}
    register: false
  tuned:
    uses: import_model
    register: true
"""


def _recipe(tmp_path, text: str = RECIPE):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_recipe(path)


def _commit(recipe, ws, name: str, files: dict[str, str], metrics: dict[str, float] | None = None) -> tuple:
    """Write ``files`` as stage ``name``'s artifact with its manifest, as the runner commits one."""
    plan = plan_stage(recipe, ws, name)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for old in plan.out_dir.iterdir():
        old.unlink()
    for rel, text in files.items():
        (plan.out_dir / rel).write_text(text, encoding="utf-8")
    manifest = build_manifest(plan, recipe.stages[name].kind.produces, plan.out_dir)
    write_json(plan.out_dir / MANIFEST_NAME, manifest)
    outcome = StageOutcome(name, "ran", plan.fingerprint, manifest["content_hash"], dict(metrics or {}), 0.1,
                           plan.out_dir)
    return plan, outcome


def _track(tracker, recipe, plan, outcome):
    """One stage run as `tunegraph stage` tracks it: start, finish, register."""
    run_id = tracker.start_stage_run(plan, None, runner="test")
    tracker.finish_stage_run(run_id, outcome)
    return run_id, tracker.register_model(run_id, recipe, plan, outcome)


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    recipe = _recipe(ws)
    tracker = Tracker.for_recipe(recipe, ws)
    return ws, recipe, tracker, MlflowClient(tracking_uri=tracker.uri)


def test_which_stages_register_and_under_which_name(tmp_path):
    recipe = _recipe(tmp_path)
    assert registered_name(recipe, "gguf") == "reg-gguf"  # shipped kinds register by default
    assert registered_name(recipe, "quant") == "shipped-q4"
    assert registered_name(recipe, "raw_q") is None  # register: false
    assert registered_name(recipe, "base") is None  # other model stages only when asked
    assert registered_name(recipe, "tuned") == "reg-tuned"


def test_register_on_a_stage_without_a_model_is_a_one_line_error_with_its_line(tmp_path):
    bad = RECIPE + "  data:\n    uses: load_dataset\n    params: {path: x.jsonl}\n    register: true\n"
    with pytest.raises(RecipeError) as err:
        _recipe(tmp_path, bad)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:23: stage 'data': register needs a stage that produces")
    assert "load_dataset produces a dataset" in message and "\n" not in message

    with pytest.raises(RecipeError, match=r":9: stage 'gguf': register: 'my/model' is not a registered model name"):
        _recipe(tmp_path, RECIPE.replace("    inputs: {model: base}\n  quant:",
                                         "    inputs: {model: base}\n    register: my/model\n  quant:"))


def test_versions_carry_the_lineage_and_only_a_new_content_hash_adds_one(store, monkeypatch):
    ws, recipe, tracker, client = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)  # where models:/ URIs resolve
    base_plan, base = _commit(recipe, ws, "base", {"config.json": "{}", "model.safetensors": "weights"})
    assert _track(tracker, recipe, base_plan, base)[1] is None  # import_model: not registered by default
    plan, outcome = _commit(recipe, ws, "gguf", {"reg.f16.gguf": "gguf bytes", "reg.f16.Modelfile": "FROM x",
                                                 "gguf_report.json": "{}"},
                            {"f16_greedy_match": 1.0, "f16_ppl_delta_pct": 0.0123456789})
    run_id, first = _track(tracker, recipe, plan, outcome)

    assert (first.name, first.version, first.created) == ("reg-gguf", "1", True)
    [version] = _versions(client, "reg-gguf")
    tags = version.tags
    assert version.run_id == run_id and version.source == f"runs:/{run_id}/model"
    assert tags["tunegraph.fingerprint"] == plan.fingerprint
    assert tags["tunegraph.content_hash"] == outcome.content_hash
    assert tags["tunegraph.upstream.model"] == f"base@{base.content_hash}"
    assert tags["tunegraph.ancestors"] == f"base@{base.content_hash[:12]}"
    assert tags["tunegraph.recipe"] == "reg" and tags["tunegraph.kind"] == "export_gguf"
    assert tags["tunegraph.stage"] == "gguf" and tags["tunegraph.git_commit"]
    assert tags["tunegraph.artifact"] == str(plan.out_dir.resolve())
    assert tags["tunegraph.metric.f16_greedy_match"] == "1"
    assert tags["tunegraph.metric.f16_ppl_delta_pct"] == "0.0123457"
    assert client.get_run(run_id).data.tags["tunegraph.registered_model"] == "reg-gguf/1"
    assert client.get_registered_model("reg-gguf").tags["tunegraph.recipe"] == "reg"

    # the source resolves to the manifest and the small files; the weights stay in DVC's place
    downloaded = mlflow.artifacts.download_artifacts("models:/reg-gguf/1", dst_path=str(ws / "dl1"))
    names = sorted(p.name for p in (ws / "dl1").rglob("*") if p.is_file())
    assert names == ["gguf_report.json", "manifest.json", "reg.f16.Modelfile"], downloaded
    logged = json.loads(next((ws / "dl1").rglob(MANIFEST_NAME)).read_text())
    assert logged["content_hash"] == outcome.content_hash and "reg.f16.gguf" in logged["files"]

    # a cached re-run (a new stage run, same content) adds no version and points at the first
    cached = StageOutcome("gguf", "cached", plan.fingerprint, outcome.content_hash, outcome.metrics, 0.0,
                          plan.out_dir)
    again_run, again = _track(tracker, recipe, plan, cached)
    assert (again.version, again.created) == ("1", False)
    assert len(_versions(client, "reg-gguf")) == 1
    assert client.get_run(again_run).data.tags["tunegraph.registered_model"] == "reg-gguf/1"
    assert not client.list_artifacts(again_run, "model")  # nothing logged twice

    # a changed artifact adds version 2, whose logged manifest is its own
    plan2, changed = _commit(recipe, ws, "gguf", {"reg.f16.gguf": "other bytes", "gguf_report.json": "{}"})
    assert changed.content_hash != outcome.content_hash
    run2, second = _track(tracker, recipe, plan2, changed)
    assert (second.version, second.created) == ("2", True)
    versions = _versions(client, "reg-gguf")
    assert [v.tags["tunegraph.content_hash"] for v in versions] == [outcome.content_hash, changed.content_hash]
    assert versions[1].source == f"runs:/{run2}/model"
    mlflow.artifacts.download_artifacts("models:/reg-gguf/2", dst_path=str(ws / "dl2"))
    assert json.loads(next((ws / "dl2").rglob(MANIFEST_NAME)).read_text())["content_hash"] == changed.content_hash

    # the same content again (e.g. a code change that gave identical bytes) adds nothing
    plan3, same = _commit(recipe, ws, "gguf", {"reg.f16.gguf": "gguf bytes", "reg.f16.Modelfile": "FROM x",
                                               "gguf_report.json": "{}"})
    assert _track(tracker, recipe, plan3, same)[1].version == "1"
    assert len(_versions(client, "reg-gguf")) == 2


def test_named_disabled_and_opted_in_stages(store):
    ws, recipe, tracker, client = store
    _commit(recipe, ws, "base", {"config.json": "{}"})
    for name in ("quant", "raw_q", "tuned"):
        plan, outcome = _commit(recipe, ws, name, {"config.json": json.dumps({"stage": name})})
        _track(tracker, recipe, plan, outcome)
    registered = sorted(m.name for m in client.search_registered_models())
    assert registered == ["reg-tuned", "shipped-q4"]  # raw_q said register: false
    [quant] = _versions(client, "shipped-q4")
    assert quant.tags["tunegraph.kind"] == "quantize_bnb" and quant.tags["tunegraph.stage"] == "quant"


FLOW_RECIPE = """\
name: tiny
base_model: tiny:llama
seed: 11
threads: 2
stages:
  base:
    uses: import_model
  gguf:
    uses: export_gguf
    inputs: {model: base}
    params: {types: [f16], greedy_prompts: 2, max_new_tokens: 4}
"""


@pytest.mark.slow
def test_a_flow_registers_the_export_once_per_content(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws", FLOW_RECIPE)
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / '.tunegraph' / 'mlflow.db'}")
    run_cli(["run", "recipe.yaml"], cwd=ws)
    [first] = _versions(client, "tiny-gguf")
    assert first.tags["tunegraph.upstream.model"].startswith("base@")
    assert first.tags["tunegraph.metric.f16_greedy_match"] == "1"
    manifest = json.loads((ws / "data/out/tiny/gguf" / MANIFEST_NAME).read_text())
    assert first.tags["tunegraph.content_hash"] == manifest["content_hash"]
    assert first.tags["tunegraph.fingerprint"] == manifest["fingerprint"]
    assert first.source == f"runs:/{first.run_id}/model"
    assert client.get_run(first.run_id).data.tags["tunegraph.stage"] == "gguf"
    assert not client.search_registered_models("name = 'tiny-base'")

    run_cli(["run", "recipe.yaml"], cwd=ws)  # every stage cached: no new version
    assert len(_versions(client, "tiny-gguf")) == 1

    (ws / "recipe.yaml").write_text(FLOW_RECIPE.replace("types: [f16]", "types: [f16], name: shipped"))
    run_cli(["run", "recipe.yaml"], cwd=ws)  # other file names: other content, version 2
    versions = _versions(client, "tiny-gguf")
    assert len(versions) == 2 and versions[1].tags["tunegraph.content_hash"] != first.tags["tunegraph.content_hash"]
    assert "tunegraph.upstream.model" in versions[1].tags

    compared = run_cli(["compare", "recipe.yaml", "--last", "3"], cwd=ws).stdout
    assert "f16_greedy_match" in compared
