"""Stage kind ``soup``: a greedy model soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482).

Rank the models by their held-out score, read from the upstream ``evaluate`` artifacts (``evals[i]``
scores ``models[i]``). Start the soup with the best one; try adding the others in rank order, where
a candidate soup is the uniform average of its ingredients (mergekit ``linear``)::

    soup = [best]
    for model in the rest, best first:
        if score(mean(soup + [model])) is not worse than score(mean(soup)):   # ">=" for accuracies, "<=" for loss
            soup.append(model)

Every score in that loop is measured by this stage, on ``dataset``, with the ``evaluate`` settings
given here (the first soup, the best model alone, included), so the comparisons are like for like;
the upstream evals only decide the order. A uniform soup of every model is ``merge`` with
``method: linear`` and no weights.

Recipe::

    soup:
      uses: soup
      inputs: {models: [sft_a, sft_b, sft_c], evals: [eval_a, eval_b, eval_c], dataset: val_data}
      params: {metric: exact_match, evaluate: {max_new_tokens: 32}}

The output is the soup as a model directory (the best model's files when nothing joined it),
``soup.json`` (ranking, every candidate's score and whether it was kept) and, when models were
averaged, ``mergekit_config.yml``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.hashing import MANIFEST_NAME
from tunegraph.merge_checks import check_compatible, check_weights_are_the_model
from tunegraph.mergekit_config import MethodParameters, config_yaml, merge_config
from tunegraph.models import model_files
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, InputsMismatch, StageResult, UpstreamNames, stage, upstream_names
from tunegraph.tasks.evaluate import SCORES_FILE, EvaluateParams, evaluate
from tunegraph.tasks.merge import CONFIG_FILE, run_mergekit

SOUP_FILE = "soup.json"
LOWER_IS_BETTER = ("loss", "perplexity")


class SoupParams(StageParams):
    metric: Literal["exact_match", "contains_match", "loss", "perplexity"] = Field(
        "exact_match", description="what ranks the models and decides whether a candidate joins the soup")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams,
                                     description="how this stage scores candidate soups on `dataset`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def check_inputs(params: SoupParams, upstream: UpstreamNames) -> None:
    models, evals = tuple(upstream.get("models", ())), tuple(upstream.get("evals", ()))
    if len(models) < 2:
        raise InputsMismatch(f"a soup needs at least 2 models; inputs.models lists {len(models)}",
                             ("inputs", "models"))
    if len(evals) != len(models):
        raise InputsMismatch(f"inputs.evals must list one evaluation per model, in the order of inputs.models "
                             f"({len(models)} models, {len(evals)} evals)", ("inputs", "evals"))


@stage("soup", params=SoupParams, produces="model",
       inputs=(InputSlot("models", ("model",), many=True), InputSlot("evals", ("eval",), many=True),
               InputSlot("dataset", ("dataset",))),
       summary_metrics=("ingredients", "soup_score"), check_inputs=check_inputs)
def soup(params: SoupParams, inputs: dict, out: Path, ctx: StageContext) -> StageResult:
    """Greedy soup: add models best-first while the held-out score does not drop."""
    try:
        check_inputs(params, upstream_names(inputs))
    except InputsMismatch as err:
        raise StageError(f"stage {ctx.stage!r}: {err}") from None
    models: dict[str, Path] = dict(inputs["models"])
    evals = dict(zip(models, inputs["evals"].values()))
    _check_pairing(models, dict(inputs["evals"]))
    check_weights_are_the_model(models)
    check_compatible(models)

    upstream_scores = {name: _read_score(evals[name], params.metric, name) for name in models}
    lower = params.metric in LOWER_IS_BETTER
    ranking = sorted(models, key=lambda name: upstream_scores[name] if lower else -upstream_scores[name])

    work = out / ".candidates"  # removed before the stage returns
    ingredients, current_dir, current_config = [ranking[0]], models[ranking[0]], None
    current_score = _score(models[ranking[0]], params, inputs["dataset"], work / "eval-0", ctx)
    steps = [{"candidate": ranking[0], "score": current_score, "kept": True}]
    for step, name in enumerate(ranking[1:], start=1):
        candidate = ingredients + [name]
        candidate_dir = work / f"soup-{step}"
        candidate_dir.mkdir(parents=True)
        config = merge_config("linear", candidate, None, {}, MethodParameters(), params.dtype)
        run_mergekit(config, {n: models[n] for n in candidate}, candidate_dir, ctx.seed)
        score = _score(candidate_dir, params, inputs["dataset"], work / f"eval-{step}", ctx)
        kept = score <= current_score if lower else score >= current_score
        ctx.info(f"soup + {name}: {params.metric} {score:.4f} vs {current_score:.4f} -> "
                 f"{'kept' if kept else 'left out'}")
        steps.append({"candidate": name, "score": score, "kept": kept})
        if kept:
            if current_config is not None:
                shutil.rmtree(current_dir)
            ingredients, current_dir, current_score, current_config = candidate, candidate_dir, score, config
        else:
            shutil.rmtree(candidate_dir)

    _place_soup(current_dir, out, from_candidate=current_config is not None)
    shutil.rmtree(work, ignore_errors=True)
    if current_config is not None:
        (out / CONFIG_FILE).write_text(config_yaml(current_config, ctx.seed), encoding="utf-8")
    record = {"metric": params.metric, "lower_is_better": lower, "ingredients": ingredients,
              "ranking": [{"model": n, "upstream_score": upstream_scores[n]} for n in ranking], "steps": steps}
    (out / SOUP_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return StageResult(metrics={"ingredients": len(ingredients), "candidates": len(models),
                                "soup_score": current_score, "best_ingredient_score": steps[0]["score"]})


def _check_pairing(models: dict[str, Path], evals: dict[str, Path]) -> None:
    """Where both carry manifests (every recipe run), ``evals[i]`` must have scored ``models[i]``."""
    for (model, model_dir), (eval_name, eval_dir) in zip(models.items(), evals.items()):
        model_manifest, eval_manifest = _manifest(model_dir), _manifest(eval_dir)
        if model_manifest is None or eval_manifest is None:
            continue
        scored = eval_manifest.get("upstream", {}).get("model", {})
        if scored.get("content_hash") != model_manifest.get("content_hash"):
            raise StageError(f"inputs.evals: {eval_name!r} scored stage {scored.get('stage')!r}, not {model!r}; "
                             f"list evals in the order of inputs.models")


def _manifest(artifact: Path) -> dict | None:
    path = artifact / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_score(eval_dir: Path, metric: str, model: str) -> float:
    path = eval_dir / SCORES_FILE
    if not path.is_file():
        raise StageError(f"the evaluation of {model!r} ({eval_dir}) has no {SCORES_FILE}: is it an evaluate stage?")
    scores = json.loads(path.read_text(encoding="utf-8"))
    if metric not in scores:
        raise StageError(f"the evaluation of {model!r} has no {metric!r} score; it has: {', '.join(sorted(scores))}")
    return float(scores[metric])


def _score(model_dir: Path, params: SoupParams, dataset: Path, scratch: Path, ctx: StageContext) -> float:
    """``params.metric`` of a model on ``dataset``, by the evaluate stage's own code."""
    scratch.mkdir(parents=True)
    result = evaluate(params.evaluate, {"model": model_dir, "dataset": dataset}, scratch, ctx)
    shutil.rmtree(scratch)
    return float(result.metrics[params.metric])


def _place_soup(source: Path, out: Path, from_candidate: bool) -> None:
    """The soup's model files at the top of ``out``: moved from a candidate dir, or copied from the lone model."""
    if from_candidate:
        for path in sorted(source.iterdir()):
            path.rename(out / path.name)
        return
    for path in model_files(source):
        shutil.copyfile(path, out / path.name)
