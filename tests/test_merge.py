"""The ``merge`` and ``soup`` stages on tiny models: every method against a hand-computed result,
seeded DARE, byte-identical reruns, and the recipe's list-valued input slots (validation, lineage, DVC)."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import stage_ctx
from tunegraph.errors import RecipeError, StageError
from tunegraph.hashing import file_hashes
from tunegraph.models import model_files
from tunegraph.tasks.merge import MergeParams, merge

WEIGHTS = "model.safetensors"


# --- tiny experts --------------------------------------------------------------------------------

def _write_variant(base_dir: Path, out: Path, state: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True)
    for path in model_files(base_dir):
        if path.name != WEIGHTS:
            shutil.copyfile(path, out / path.name)
    save_file({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def experts(tiny_artifacts, tmp_path_factory) -> Path:
    """base/ (the tiny llama) and a/, b/, c/: base + a shared direction + each its own noise, so the
    task vectors disagree in sign in places (TIES has something to elect) and correlate (model stock's
    t is neither 0 nor 1)."""
    root = tmp_path_factory.mktemp("experts")
    base_dir = tiny_artifacts / "model"
    shutil.copytree(base_dir, root / "base")
    base = load_file(base_dir / WEIGHTS)
    generator = torch.Generator().manual_seed(0)
    shared = {k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    for name in ("a", "b", "c"):
        state = {k: v + shared[k] + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        _write_variant(base_dir, root / name, state)
    return root


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / WEIGHTS)


def run_merge(experts: Path, out: Path, method: str, names=("a", "b"), base: bool = True, **params):
    """The merge stage on ``names`` (+ base), ``params`` as in a recipe; the merged weights and result."""
    out.mkdir(parents=True)
    inputs = {"models": {name: experts / name for name in names}}
    if base:
        inputs["base"] = experts / "base"
    result = merge(MergeParams(method=method, **params), inputs, out, stage_ctx(out, "merge"))
    return weights(out), result


def assert_all_close(merged: dict, expected: dict, atol: float = 1e-6) -> None:
    """mergekit computes in float32, the references in float64: 1e-6 on weights of size ~0.1."""
    assert merged.keys() == expected.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name].to(torch.float32), rtol=1e-5, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


# --- reference math, written from the papers -----------------------------------------------------

def ties_reference(base: torch.Tensor, models: list[torch.Tensor], weights_: list[float],
                   density: float | list[float], lam: float = 1.0) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim, elect sign, disjoint (weighted) mean, per tensor."""
    densities = density if isinstance(density, list) else [density] * len(models)
    trimmed = []
    for theta, density in zip(models, densities):  # trim: keep the top density fraction of |tau| in this tensor
        tau = (theta - base).double().flatten()
        keep = torch.zeros_like(tau)
        keep[torch.argsort(tau.abs(), descending=True)[:max(1, int(density * tau.numel()))]] = 1
        trimmed.append(tau * keep)
    weighted = torch.stack([w * t for w, t in zip(weights_, trimmed)])
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()  # elect: sign of the summed mass
    agree = weighted.sign() == elected
    divisor = (torch.tensor(weights_).double()[:, None] * agree).sum(0)
    merged_tau = (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)  # disjoint mean
    return base + lam * merged_tau.reshape(base.shape)


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """sin((1-t)W)/sin W v0 + sin(tW)/sin W v1, W the angle between the flattened tensors."""
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = float((a / a.norm()) @ (b / b.norm()))
    if abs(dot) > 0.9995:  # (anti)parallel: mergekit falls back to linear interpolation
        return ((1 - t) * a + t * b).reshape(v0.shape)
    omega = math.acos(dot)
    return ((math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)).reshape(v0.shape)


def model_stock_reference(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): t = N cos / (1 + (N-1) cos) toward the average of the models."""
    offsets = [(m - base).double().flatten() for m in models]
    cosines = [float(x @ y / (x.norm() * y.norm())) for i, x in enumerate(offsets) for y in offsets[i + 1:]]
    cos, count = sum(cosines) / len(cosines), len(models)
    t = count * cos / (1 + (count - 1) * cos)
    average = sum(m.double() for m in models) / count
    return t * average + (1 - t) * base.double()


def test_ties_reference_on_a_hand_worked_example():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([0.4, -0.1, 0.2, -0.3], dtype=torch.float64)   # density 0.5 keeps 0.4 and -0.3
    b = torch.tensor([-0.6, 0.5, 0.1, -0.2], dtype=torch.float64)   # keeps -0.6 and 0.5
    # summed mass [-0.2, 0.5, 0, -0.3] elects [-, +, +, -]: position 0 keeps only b's -0.6, position 2
    # has no surviving entry, position 3 only a's -0.3
    assert ties_reference(base, [a, b], [1.0, 1.0], 0.5).tolist() == pytest.approx([-0.6, 0.5, 0.0, -0.3])
    c = torch.tensor([0.4, -0.1, 0.2, -0.3], dtype=torch.float64)
    d = torch.tensor([0.05, 0.5, 0.1, -0.6], dtype=torch.float64)  # keeps 0.5 and -0.6
    # weights 2 and 1: position 3 is the weighted mean (2*-0.3 + 1*-0.6) / (2 + 1) = -0.4
    assert ties_reference(base, [c, d], [2.0, 1.0], 0.5).tolist() == pytest.approx([0.4, 0.5, 0.0, -0.4])
    assert ties_reference(base, [c, d], [1.0, 1.0], 0.5, lam=2.0)[3] == pytest.approx(-0.9)


def test_slerp_reference_on_a_hand_worked_example():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert slerp_reference(0.5, v0, v1).tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    assert slerp_reference(1 / 3, v0, v1).tolist() == pytest.approx([math.cos(math.pi / 6), math.sin(math.pi / 6)])


# --- each method through the stage ---------------------------------------------------------------

def test_linear_is_the_weighted_average_and_a_uniform_soup_without_weights(experts, tmp_path):
    a, b = weights(experts / "a"), weights(experts / "b")
    merged, result = run_merge(experts, tmp_path / "w", "linear", base=False,
                               models={"a": {"weight": 0.7}, "b": {"weight": 0.3}})
    assert_all_close(merged, {k: (0.7 * a[k].double() + 0.3 * b[k].double()) / 1.0 for k in a})
    soup, _ = run_merge(experts, tmp_path / "u", "linear", base=False)
    assert_all_close(soup, {k: (a[k].double() + b[k].double()) / 2 for k in a})
    assert result.metrics == {"models": 2, "parameters": float(sum(v.numel() for v in a.values()))}


def test_task_arithmetic_adds_scaled_task_vectors_and_negates(experts, tmp_path):
    base, a, b = weights(experts / "base"), weights(experts / "a"), weights(experts / "b")
    merged, _ = run_merge(experts, tmp_path / "m", "task_arithmetic",
                          models={"a": {"weight": 1.0}, "b": {"weight": -0.5}}, parameters={"lambda": 0.8})
    expected = {k: base[k].double() + 0.8 * ((a[k].double() - base[k]) - 0.5 * (b[k].double() - base[k]))
                for k in base}
    assert_all_close(merged, expected)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(experts, tmp_path):
    base, a, b = weights(experts / "base"), weights(experts / "a"), weights(experts / "b")
    merged, _ = run_merge(experts, tmp_path / "m", "ties",
                          models={"a": {"weight": 0.6, "density": 0.5}, "b": {"weight": 0.4, "density": 0.5}},
                          parameters={"lambda": 0.9})
    expected = {k: ties_reference(base[k].double(), [a[k], b[k]], [0.6, 0.4], 0.5, lam=0.9) for k in base}
    assert_all_close(merged, expected)
    # the example is not degenerate: some elements lost a disagreeing task vector's entry
    name = "model.layers.0.mlp.up_proj.weight"
    ta, tb = a[name] - base[name], b[name] - base[name]
    assert ((ta * tb) < 0).any()


def test_slerp_interpolates_on_the_sphere_per_tensor(experts, tmp_path):
    a, b = weights(experts / "a"), weights(experts / "b")
    merged, _ = run_merge(experts, tmp_path / "m", "slerp", base=False, parameters={"t": 0.3})
    assert_all_close(merged, {k: slerp_reference(0.3, a[k], b[k]) for k in a})
    embed = "model.embed_tokens.weight"  # this one is a true spherical step, not the linear fallback
    cosine = float(torch.nn.functional.cosine_similarity(a[embed].flatten(), b[embed].flatten(), dim=0))
    assert cosine < 0.9995


def test_slerp_takes_per_tensor_filters(experts, tmp_path):
    a, b = weights(experts / "a"), weights(experts / "b")
    merged, _ = run_merge(experts, tmp_path / "m", "slerp", base=False,
                          parameters={"t": [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]})
    for name in a:
        assert torch.equal(merged[name], a[name] if "self_attn" in name else b[name]), name


def test_model_stock_moves_toward_the_average_by_the_cosine_rule(experts, tmp_path):
    base = weights(experts / "base")
    experts_ = [weights(experts / n) for n in ("a", "b", "c")]
    merged, _ = run_merge(experts, tmp_path / "m", "model_stock", names=("a", "b", "c"))
    # mergekit sums the 3.1M-entry embedding's dot products in float32: cos is off by ~1e-4, so t by ~5e-5
    # and the weights by up to ~6e-6; a wrong t (or formula) is off by orders of magnitude more.
    assert_all_close(merged, {k: model_stock_reference(base[k], [e[k] for e in experts_]) for k in base}, atol=2e-5)


def test_dare_with_density_one_is_task_arithmetic(experts, tmp_path):
    per_model = {"a": {"weight": 0.5}, "b": {"weight": 0.5}}
    dare, _ = run_merge(experts, tmp_path / "dare", "dare_linear", models=per_model, parameters={"density": 1.0})
    plain, _ = run_merge(experts, tmp_path / "ta", "task_arithmetic", models=per_model)
    assert all(torch.equal(dare[k], plain[k]) for k in plain)


def test_dare_drops_at_the_density_and_rescales_the_survivors(experts, tmp_path):
    base, a = weights(experts / "base"), weights(experts / "a")
    merged, _ = run_merge(experts, tmp_path / "m", "dare_linear", names=("a",), models={"a": {"density": 0.3}})
    name = "model.embed_tokens.weight"  # 3.1M entries: the kept fraction is 0.3 to within 0.001
    tau, kept = (a[name] - base[name]).double(), (merged[name] - base[name]).double()
    survived = kept != 0
    assert abs(survived.double().mean().item() - 0.3) < 0.002
    scale = tau.abs().sum() / tau[survived].abs().sum()  # one factor per tensor: the L1 norm of tau is kept
    assert 3.0 < scale < 3.7
    torch.testing.assert_close(kept[survived], scale * tau[survived], rtol=0, atol=1e-6)


def test_dare_is_seeded_and_reruns_are_byte_identical(experts, tmp_path):
    params = dict(models={"a": {"weight": 0.5}, "b": {"weight": 0.5}}, parameters={"density": 0.5})
    run_merge(experts, tmp_path / "one", "dare_ties", **params)
    run_merge(experts, tmp_path / "two", "dare_ties", **params)
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")
    (tmp_path / "other").mkdir()
    ctx = stage_ctx(tmp_path, "merge")
    ctx.seed = 6
    merge(MergeParams(method="dare_ties", **params),
          {"models": {"a": experts / "a", "b": experts / "b"}, "base": experts / "base"}, tmp_path / "other", ctx)
    assert not torch.equal(weights(tmp_path / "one")["model.embed_tokens.weight"],
                           weights(tmp_path / "other")["model.embed_tokens.weight"])


def test_output_loads_with_tokenizer_chat_template_and_the_config_that_ran(experts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_merge(experts, tmp_path / "m", "ties", models={"a": {"density": 0.7}}, parameters={"density": 0.5})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size == 64
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(experts / "base").chat_template
    config = yaml.safe_load((tmp_path / "m" / "mergekit_config.yml").read_text())
    assert config["merge_method"] == "ties" and config["base_model"] == "base"
    assert config["models"] == [{"model": "a", "parameters": {"density": 0.7, "weight": 1.0}},
                                {"model": "b", "parameters": {"weight": 1.0}}]
    assert config["parameters"] == {"density": 0.5}
    assert str(tmp_path) not in (tmp_path / "m" / "mergekit_config.yml").read_text()


def test_merge_refuses_mismatched_inputs_at_run_time(experts, tmp_path):
    with pytest.raises(StageError, match="'c', which inputs.models does not list"):
        run_merge(experts, tmp_path / "m", "ties", models={"c": {"weight": 1.0}})
    with pytest.raises(StageError, match="ties needs a base model"):
        run_merge(experts, tmp_path / "n", "ties", base=False)
    assert not any((tmp_path / "n").iterdir())


# --- recipes with list-valued inputs -------------------------------------------------------------

MERGE_RECIPE = """\
name: merging
base_model: tiny:llama
seed: 3
stages:
  base:
    uses: import_model
  a:
    uses: import_model
    params: {model: ./experts/a}
  b:
    uses: import_model
    params: {model: ./experts/b}
  merged:
    uses: merge
    inputs: {models: [a, b], base: base}
    params:
      method: ties
      models:
        a: {weight: 0.6, density: 0.5}
        b: {weight: 0.4}
      parameters: {density: 0.7}
"""


def write_recipe(root: Path, text: str = MERGE_RECIPE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(textwrap.dedent(text))
    return root / "recipe.yaml"


def recipe_error(tmp_path: Path, text: str) -> str:
    from tunegraph.recipe import load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, text))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_recipe_with_a_list_input_orders_and_links_every_upstream(tmp_path):
    from tunegraph.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path))
    assert recipe.order == ("base", "a", "b", "merged")
    assert recipe.ancestors("merged") == {"base", "a", "b"}
    assert recipe.descendants("b") == {"merged"}
    assert recipe.stages["merged"].spec.upstream_stages() == ("a", "b", "base")


def test_recipe_errors_for_list_inputs_name_the_line(tmp_path):
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("[a, b]", "[a, bb]"))
    assert "recipe.yaml:15" in message and "no stage named 'bb'" in message and "did you mean 'b'" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("base: base}", "base: [base, a]}"))
    assert "recipe.yaml:15" in message and "input 'base' takes one upstream stage, got a list" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("[a, b]", "[a, a]"))
    assert "lists 'a' twice" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("[a, b]", "[]"))
    assert "the list is empty" in message


def test_recipe_checks_per_model_params_against_the_listed_inputs(tmp_path):
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("        b: {weight: 0.4}", "        bb: {weight: 0.4}"))
    assert "recipe.yaml:20" in message and "'bb', which inputs.models does not list" in message
    assert "did you mean 'b'" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("{weight: 0.4}", "{weight: 0.4, t: 0.5}"))
    assert "recipe.yaml:20" in message and "unknown key 'models.b.t'" in message and "weight, density" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("{density: 0.7}", "{t: 0.7}"))
    assert "recipe.yaml:21" in message and "parameter 't' does not apply to ties" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("method: ties", "method: slerp"))
    assert "recipe.yaml:15" in message and "slerp interpolates between the two listed models" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("inputs: {models: [a, b], base: base}",
                                                          "inputs: {models: [a, b]}"))
    assert "ties needs a base model" in message
    message = recipe_error(tmp_path, MERGE_RECIPE.replace("density: 0.5}", "density: 1.5}"))
    assert "recipe.yaml:19" in message and "density must lie in [0.0, 1.0]" in message


def test_cli_validate_and_kinds_show_list_inputs(tmp_path, capsys):
    from tunegraph.cli import main

    assert main(["validate", str(write_recipe(tmp_path))]) == 0
    assert "models<-[a, b], base<-base" in capsys.readouterr().out
    assert main(["kinds"]) == 0
    kinds = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "models:model[], base:model?" in kinds["merge"]


def test_dvc_stage_depends_on_every_listed_upstream(tmp_path):
    from tunegraph.dvcgen import dvc_stage
    from tunegraph.recipe import load_recipe

    stage = dvc_stage(load_recipe(write_recipe(tmp_path)), "merged", tmp_path)
    assert {"data/out/merging/a", "data/out/merging/b", "data/out/merging/base"} <= set(stage["deps"])


def _fake_upstreams(root: Path, hashes: dict[str, str]) -> None:
    """Upstream artifacts as plan_stage sees them: a manifest holding a content hash."""
    for name, content_hash in hashes.items():
        artifact = root / "data/out/merging" / name
        artifact.mkdir(parents=True, exist_ok=True)
        (artifact / "manifest.json").write_text(json.dumps({"content_hash": content_hash}))


def test_fingerprint_covers_every_listed_upstream_and_their_order(tmp_path):
    from tunegraph.lineage import plan_stage
    from tunegraph.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path))
    _fake_upstreams(tmp_path, {"base": "h0", "a": "h1", "b": "h2"})
    plan = plan_stage(recipe, tmp_path, "merged")
    assert plan.upstream == {"models.0": {"stage": "a", "content_hash": "h1"},
                             "models.1": {"stage": "b", "content_hash": "h2"},
                             "base": {"stage": "base", "content_hash": "h0"}}
    assert list(plan.inputs["models"]) == ["a", "b"] and plan.inputs["base"].name == "base"
    _fake_upstreams(tmp_path, {"b": "h2-changed"})
    assert plan_stage(recipe, tmp_path, "merged").fingerprint != plan.fingerprint
    _fake_upstreams(tmp_path, {"b": "h2"})
    assert plan_stage(recipe, tmp_path, "merged").fingerprint == plan.fingerprint
    swapped = load_recipe(write_recipe(tmp_path / "swapped", MERGE_RECIPE.replace("[a, b]", "[b, a]")))
    _fake_upstreams(tmp_path / "swapped", {"base": "h0", "a": "h1", "b": "h2"})
    assert plan_stage(swapped, tmp_path / "swapped", "merged").fingerprint != plan.fingerprint


def test_runner_merges_through_the_recipe_with_lineage(experts, tmp_path):
    from tunegraph.recipe import load_recipe
    from tunegraph.runner import execute_stage

    shutil.copytree(experts / "a", tmp_path / "experts/a")
    shutil.copytree(experts / "b", tmp_path / "experts/b")
    recipe = load_recipe(write_recipe(tmp_path))
    for name in recipe.order:
        outcome = execute_stage(recipe, tmp_path, name)
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert [manifest["upstream"][k]["stage"] for k in ("models.0", "models.1", "base")] == ["a", "b", "base"]
    base, a, b = (weights(tmp_path / "data/out/merging" / n) for n in ("base", "a", "b"))
    # a's density is its own (0.5), b's comes from the method-wide parameters (0.7)
    expected = {k: ties_reference(base[k].double(), [a[k], b[k]], [0.6, 0.4], [0.5, 0.7]) for k in base}
    assert_all_close(weights(outcome.path), expected)
    assert execute_stage(recipe, tmp_path, "merged").status == "cached"


# --- greedy soup ---------------------------------------------------------------------------------

def test_greedy_soup_adds_models_best_first_while_the_loss_does_not_rise(experts, tiny_artifacts, tmp_path):
    from tunegraph.tasks.evaluate import EvaluateParams, evaluate
    from tunegraph.tasks.soup import SoupParams, soup

    base = weights(experts / "base")
    generator = torch.Generator().manual_seed(1)
    _write_variant(experts / "base", tmp_path / "noisy", {k: v + 0.3 * torch.randn(v.shape, generator=generator)
                                                          for k, v in base.items()})
    models = {"a": experts / "a", "noisy": tmp_path / "noisy", "b": experts / "b", "c": experts / "c"}
    scoring = EvaluateParams(max_new_tokens=2, limit=4)
    evals = {}
    for name, path in models.items():
        evals[f"eval_{name}"] = tmp_path / f"eval_{name}"
        evals[f"eval_{name}"].mkdir()
        evaluate(scoring, {"model": path, "dataset": tiny_artifacts / "eval"}, evals[f"eval_{name}"],
                 stage_ctx(tmp_path, "eval"))
    out = tmp_path / "soup"
    out.mkdir()
    result = soup(SoupParams(metric="loss", evaluate=scoring),
                  {"models": models, "evals": evals, "dataset": tiny_artifacts / "eval"}, out, stage_ctx(out, "soup"))

    record = json.loads((out / "soup.json").read_text())
    upstream = [r["upstream_score"] for r in record["ranking"]]
    assert upstream == sorted(upstream) and record["ranking"][-1]["model"] == "noisy"  # lower loss first
    current = record["steps"][0]["score"]
    for step in record["steps"][1:]:  # each decision follows the rule, against the soup so far
        assert step["kept"] == (step["score"] <= current)
        current = step["score"] if step["kept"] else current
    assert "noisy" not in record["ingredients"] and len(record["ingredients"]) >= 2
    soup_weights = weights(out)
    members = [weights(models[n]) for n in record["ingredients"]]
    assert_all_close(soup_weights, {k: sum(m[k].double() for m in members) / len(members) for k in soup_weights})
    assert result.metrics["ingredients"] == len(record["ingredients"]) and result.metrics["soup_score"] == current
    assert not (out / ".candidates").exists()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"


def test_soup_checks_that_evals_follow_the_models(experts, tmp_path):
    from tunegraph.tasks.soup import SoupParams, check_inputs, soup

    with pytest.raises(StageError, match=r"one evaluation per model.*\(2 models, 1 evals\)"):
        check_inputs(SoupParams(), {"models": ("a", "b"), "evals": ("eval_a",)})
    # as the runner leaves them: eval manifests name the model artifact (by content hash) they scored
    roots = {}
    for name in ("a", "b"):
        roots[name] = tmp_path / name
        shutil.copytree(experts / name, roots[name])
        (roots[name] / "manifest.json").write_text(json.dumps({"content_hash": f"hash-{name}"}))
        (tmp_path / f"eval_{name}").mkdir()
        (tmp_path / f"eval_{name}" / "manifest.json").write_text(
            json.dumps({"upstream": {"model": {"stage": name, "content_hash": f"hash-{name}"}}}))
    swapped = {"eval_b": tmp_path / "eval_b", "eval_a": tmp_path / "eval_a"}
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match="'eval_b' scored stage 'b', not 'a'"):
        soup(SoupParams(), {"models": roots, "evals": swapped, "dataset": tmp_path}, tmp_path / "out",
             stage_ctx(tmp_path))
