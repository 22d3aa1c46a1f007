"""Recipe validation: every mistake is one line naming file, line, stage and field."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunegraph.errors import RecipeError
from tunegraph.recipe import load_recipe

GOOD = """\
name: demo
base_model: tiny:llama
seed: 7
stages:
  base:
    uses: import_model
  data:
    uses: load_dataset
    params:
      path: data.jsonl
  tuned:
    uses: sft
    inputs: {model: base, dataset: data}
    params:
      epochs: 1
  score:
    uses: evaluate
    inputs: {model: tuned, dataset: data}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, text))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_good_recipe_orders_stages_topologically(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.order == ("base", "data", "tuned", "score")
    assert recipe.stages["base"].params.model == "tiny:llama"  # defaults to base_model
    assert recipe.descendants("base") == {"tuned", "score"}
    assert recipe.ancestors("score") == {"base", "data", "tuned"}


def test_unknown_top_level_key_names_nearest(tmp_path):
    message = error_of(tmp_path, GOOD.replace("seed: 7", "sed: 7"))
    assert "recipe.yaml:3" in message and "'sed'" in message and "did you mean 'seed'" in message


def test_unknown_param_names_stage_line_and_nearest(tmp_path):
    message = error_of(tmp_path, GOOD.replace("epochs: 1", "epocs: 1"))
    assert "recipe.yaml:15" in message
    assert "stage 'tuned' params" in message and "did you mean 'epochs'" in message


def test_wrong_type_names_field(tmp_path):
    message = error_of(tmp_path, GOOD.replace("epochs: 1", "epochs: many"))
    assert "recipe.yaml:15" in message and "'epochs'" in message and "many" in message


def test_unknown_stage_kind(tmp_path):
    message = error_of(tmp_path, GOOD.replace("uses: sft", "uses: sfft"))
    assert "recipe.yaml:12" in message and "did you mean 'sft'" in message


def test_missing_upstream_stage(tmp_path):
    message = error_of(tmp_path, GOOD.replace("{model: base, dataset: data}", "{model: bse, dataset: data}"))
    assert "no stage named 'bse'" in message and "did you mean 'base'" in message and "recipe.yaml:13" in message


def test_missing_required_input(tmp_path):
    message = error_of(tmp_path, GOOD.replace("{model: tuned, dataset: data}", "{model: tuned}"))
    assert "stage 'score': missing input 'dataset'" in message


def test_wrong_artifact_type_on_edge(tmp_path):
    message = error_of(tmp_path, GOOD.replace("{model: tuned, dataset: data}", "{model: data, dataset: data}"))
    assert "takes a model" in message and "produces a dataset" in message


def test_cycle_is_named(tmp_path):
    cyclic = GOOD.replace("inputs: {model: base, dataset: data}", "inputs: {model: again, dataset: data}") + \
        "  again:\n    uses: sft\n    inputs: {model: tuned, dataset: data}\n"
    message = error_of(tmp_path, cyclic)
    assert "cycle" in message and "tuned" in message and "again" in message


def test_invalid_yaml_has_line(tmp_path):
    message = error_of(tmp_path, GOOD.replace("  data:\n", "  data\n  :\n"))
    assert "invalid YAML" in message and "recipe.yaml:" in message


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, GOOD.replace("epochs: 1", "epocs: 1"))
    result = subprocess.run([sys.executable, "-P", "-m", "tunegraph.cli", "validate", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_shipped_recipes_validate():
    recipes = {path.stem: load_recipe(path)
               for path in sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))}
    assert {"quickstart", "arithmetic", "experts"} <= recipes.keys()


def test_experts_recipe_has_the_issue_shape():
    """SFT and GRPO experts from one base -> TIES merge -> GGUF Q8_0, every model evaluated, a card."""
    recipe = load_recipe(Path(__file__).parents[1] / "recipes/experts.yaml")
    stages = recipe.stages
    kinds = {name: stage.kind.name for name, stage in stages.items()}
    assert recipe.spec.base_model == "embedded:smollm2-135m-instruct"
    assert kinds["sft"] == "sft" and kinds["grpo"] == "grpo"
    assert stages["sft"].spec.inputs["model"] == stages["grpo"].spec.inputs["model"] == "base"
    assert stages["grpo"].params.rewards == {"numeric_match": 1.0}
    merge = stages["merged"]
    assert merge.params.method == "ties" and merge.spec.inputs == {"models": ["sft", "grpo"], "base": "base"}
    assert set(merge.params.models) == {"sft", "grpo"}
    assert all(m.weight is not None and m.density is not None for m in merge.params.models.values())
    assert kinds["gguf"] == "export_gguf" and stages["gguf"].params.types == ["q8_0"]
    assert stages["gguf"].spec.inputs["model"] == "merged"
    evaluated = {stage.spec.inputs["model"] for stage in stages.values() if stage.kind.name == "evaluate"}
    assert evaluated == {"base", "sft", "grpo", "merged"}
    assert set(stages["gguf"].spec.inputs["evals"]) == {n for n, k in kinds.items() if k == "evaluate"}
    assert "model_card" in kinds.values()
