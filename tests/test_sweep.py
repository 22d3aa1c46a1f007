"""Sweeps: grid validation with file:line errors, point recipes, fingerprint-keyed sharing between points,
ranking; and one real sweep (`tunegraph run` of a 2-point grid) through Prefect and MLflow."""

from __future__ import annotations

import re
import textwrap

import pytest
from mlflow import MlflowClient

from conftest import REPO, TINY_RECIPE, make_tiny_workspace, run_cli
from tunegraph.errors import RecipeError
from tunegraph.lineage import artifact_dir
from tunegraph.recipe import load_recipe
from tunegraph.runner import execute_stage
from tunegraph.sweep import PointOutcome, SweepPoint, grid_points, ranked, share_artifacts, write_variant

DATA_RECIPE = """\
name: share
base_model: tiny:llama
seed: 3
stages:
  train_data: {uses: load_dataset, params: {path: train.jsonl}}
  eval_data: {uses: load_dataset, params: {path: eval.jsonl, limit: 4}}
  clean_train: {uses: filter, inputs: {dataset: train_data}}
  clean_eval: {uses: filter, inputs: {dataset: eval_data}}
sweep:
  grid:
    stages.eval_data.params.limit: [2, 3]
  metric: clean_eval.rows
  goal: maximize
"""


def _workspace(tmp_path, recipe_text: str):
    ws = tmp_path / "ws"
    ws.mkdir()
    lines = (REPO / "data/quickstart/train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (ws / "train.jsonl").write_text("".join(lines[:10]), encoding="utf-8")
    (ws / "eval.jsonl").write_text("".join((REPO / "data/quickstart/eval.jsonl").read_text().splitlines(True)[:4]))
    (ws / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    return ws


SWEEP_MISTAKES = [
    # (sweep block, the line the error must name, words it must contain)
    ("  grid: {stages.sft.params.lerning_rate: [1.0e-3]}\n  metric: eval_sft.exact_match\n",
     "lerning_rate", ["unknown key 'lerning_rate'", "did you mean 'learning_rate'"]),
    ("  grid:\n    stages.sft.params.learning_rate: [fast]\n  metric: eval_sft.exact_match\n",
     "learning_rate: [fast]", ["'fast'", "valid number"]),
    ("  grid:\n    stages.sfft.params.learning_rate: [1.0e-3]\n  metric: eval_sft.exact_match\n",
     "sfft", ["no stage named 'sfft'", "did you mean 'sft'"]),
    ("  grid:\n    stages.sft.learning_rate: [1.0e-3]\n  metric: eval_sft.exact_match\n",
     "stages.sft.learning_rate", ["stages.STAGE.params.KEY"]),
    ("  grid:\n    stages.sft.params.lora.r: []\n  metric: eval_sft.exact_match\n",
     "lora.r", ["list of values is empty"]),
    ("  grid:\n    stages.sft.params.learning_rate: [1.0e-3]\n  metric: eval_sfft.exact_match\n",
     "metric:", ["sweep metric 'eval_sfft.exact_match'", "did you mean 'eval_sft'"]),
    ("  grid:\n    stages.sft.params.learning_rate: [1.0e-3]\n  metric: eval_sft.exact_match\n  goal: best\n",
     "goal:", ["goal"]),
]


@pytest.mark.parametrize("block, line_text, words", SWEEP_MISTAKES, ids=lambda v: str(v)[:20])
def test_sweep_mistakes_name_the_file_line(tmp_path, block, line_text, words):
    text = TINY_RECIPE + "sweep:\n" + block
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if line_text in row and i > len(TINY_RECIPE.splitlines()))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message


def test_points_are_the_grid_product_and_variants_are_plain_recipes(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws", TINY_RECIPE + textwrap.dedent("""\
        sweep:
          grid:
            stages.sft.params.learning_rate: [1.0e-3, 3.0e-3]
            stages.sft.params.lora.r: [4, 8, 16]
          metric: eval_sft.perplexity
          goal: minimize
        """))
    recipe = load_recipe(ws / "recipe.yaml")
    points = grid_points(recipe)
    assert [tuple(p.values.values()) for p in points] == [(lr, r) for lr in (1e-3, 3e-3) for r in (4, 8, 16)]
    assert len({p.id for p in points}) == 6
    assert grid_points(recipe)[4].id == points[4].id  # ids depend on the values only

    variant = load_recipe(write_variant(recipe, points[4], ws))
    assert variant.spec.sweep is None and variant.name == f"tiny-{points[4].id}"
    assert variant.stages["sft"].params.learning_rate == 3e-3 and variant.stages["sft"].params.lora.r == 8
    assert variant.output_root(ws) == ws / "data/out/tiny/sweep" / points[4].id
    assert variant.spec.tracking.experiment == "tiny"  # every point in the parent's MLflow experiment
    assert variant.stages["eval_sft"].params == recipe.stages["eval_sft"].params


def test_ranking_follows_the_goal_and_puts_points_without_a_value_last():
    def outcome(name, value):
        return PointOutcome(SweepPoint(name, {}), "ok" if value is not None else "failed", value, [], {}, None)

    points = [outcome("a", 0.5), outcome("b", None), outcome("c", 0.9), outcome("d", 0.1)]
    assert [o.point.id for o in ranked(points, "maximize")] == ["c", "a", "d", "b"]
    assert [o.point.id for o in ranked(points, "minimize")] == ["d", "a", "c", "b"]


def test_points_share_the_artifacts_of_stages_no_grid_value_reaches(tmp_path):
    ws = _workspace(tmp_path, DATA_RECIPE)
    recipe = load_recipe(ws / "recipe.yaml")
    first, second = (load_recipe(write_variant(recipe, point, ws)) for point in grid_points(recipe))
    for name in first.order:
        assert execute_stage(first, ws, name).status == "ran"

    shared = share_artifacts(second, ws, [first])
    assert shared == {"train_data": first.name, "clean_train": first.name}  # downstream of a shared stage too
    for name in shared:  # hard links to the first point's files, not copies
        for path in (artifact_dir(first, ws, name)).rglob("*"):
            twin = artifact_dir(second, ws, name) / path.relative_to(artifact_dir(first, ws, name))
            assert path.is_dir() or path.stat().st_ino == twin.stat().st_ino, twin
    statuses = {name: execute_stage(second, ws, name).status for name in second.order}
    assert statuses == {"train_data": "cached", "clean_train": "cached", "eval_data": "ran", "clean_eval": "ran"}
    assert share_artifacts(second, ws, [first]) == {}  # nothing left to share


def _runs(workspace):
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / '.tunegraph' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_a_sweep_runs_shared_stages_once_and_ranks_its_points(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws", TINY_RECIPE + textwrap.dedent("""\
        sweep:
          grid:
            stages.sft.params.learning_rate: [1.0e-3, 5.0e-3]
          metric: eval_sft.perplexity
          goal: minimize
        """))
    result = run_cli(["run", "recipe.yaml", "--parallel", "2"], cwd=ws)  # independent stages at once

    client, runs = _runs(ws)
    sweeps = [r for r in runs if r.data.tags.get("tunegraph.role") == "sweep"]
    points = [r for r in runs if r.data.tags.get("tunegraph.role") == "flow"]
    assert len(sweeps) == 1 and len(points) == 2
    assert all(p.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id for p in points)

    def statuses(point):
        children = client.search_runs([point.info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{point.info.run_id}'")
        return {c.data.tags["tunegraph.stage"]: c.data.tags["tunegraph.status"] for c in children}

    assert statuses(points[0]) == dict.fromkeys(["base", "train_data", "eval_data", "sft", "eval_sft"], "ran")
    assert statuses(points[1]) == {"base": "cached", "train_data": "cached", "eval_data": "cached",
                                   "sft": "ran", "eval_sft": "ran"}
    ids = [p.data.tags["tunegraph.sweep.point"] for p in points]
    root = ws / "data/out/tiny/sweep"
    base_files = [root / point / "base" / "model.safetensors" for point in ids]
    assert base_files[0].stat().st_ino == base_files[1].stat().st_ino  # one artifact, two points
    assert [p.data.params["sweep.sft.learning_rate"] for p in points] == ["0.001", "0.005"]

    import json
    perplexity = {pid: json.loads((root / pid / "metrics/eval_sft.json").read_text())["perplexity"] for pid in ids}
    assert perplexity[ids[0]] != perplexity[ids[1]]
    table = [line for line in result.stdout.splitlines() if re.search(r"│ [12] +│", line)]
    ranked_ids = [re.search(r"│ [12] +│ (\w+)", line).group(1) for line in table]
    assert ranked_ids == sorted(ids, key=perplexity.get)  # minimize: lowest perplexity first
    assert len(re.findall(r"report:\s+\S+\.html", result.stdout)) == 2  # one report per point
