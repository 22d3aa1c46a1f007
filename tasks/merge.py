"""Stage kind ``merge``: merge fine-tuned models with mergekit (linear/soup, SLERP, task arithmetic, TIES,
DARE, model stock); the methods and their math are in :mod:`tunegraph.mergekit_config`.

Recipe shape (parameter names are mergekit's)::

    merged:
      uses: merge
      inputs: {models: [sft, grpo], base: base}     # models: a list of upstream stages; base: one stage
      params:
        method: ties
        models:                                     # per-model parameters, keyed by upstream stage name
          sft:  {weight: 0.6, density: 0.5}
          grpo: {weight: 0.4, density: 0.5}
        parameters: {lambda: 1.0, normalize: true}  # method-wide; weight/density here set every model's default

This is mergekit's YAML with the models named by stage: ``models: [{model: sft, parameters: {...}}]``
becomes ``inputs.models`` plus ``params.models.sft``. Keys of ``params.models`` must be listed in
``inputs.models``. Inputs by method: ``linear`` (a uniform soup when no weights are given) and
``slerp`` (exactly two models, ``t = 0`` is the first listed) take no base; ``task_arithmetic``,
``ties``, ``dare_linear``, ``dare_ties`` and ``model_stock`` (two or more models) need one.

Before merging, every input (base included) must share architecture, tensor shapes, vocabulary and chat
template (:mod:`tunegraph.merge_checks`). The output is a model directory ``from_pretrained`` loads:
weights, config, the base's tokenizer and chat template, and ``mergekit_config.yml``: the configuration
that ran, models named by stage. DARE's random drops come from mergekit's seeded torch generator: the
same recipe gives byte-identical weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal, Mapping

from pydantic import Field

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.merge_checks import check_compatible, check_weights_are_the_model, tensor_shapes
from tunegraph.mergekit_config import (MergeMethod, MethodParameters, ModelParameters, check_merge_inputs,
                                       config_yaml, merge_config, with_paths)
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, InputsMismatch, StageResult, UpstreamNames, stage, upstream_names

CONFIG_FILE = "mergekit_config.yml"


class MergeParams(StageParams):
    method: MergeMethod = Field(description="linear, slerp, task_arithmetic, ties, dare_linear, dare_ties or "
                                            "model_stock")
    models: dict[str, ModelParameters] = Field(
        default_factory=dict, description="per-model parameters (weight, density) keyed by upstream stage name")
    parameters: MethodParameters = Field(default_factory=MethodParameters,
                                         description="method-wide parameters (t, lambda, normalize, rescale, "
                                                     "int8_mask, filter_wise; weight/density defaults)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the merge and the "
                                                                                   "saved weights")


def check_inputs(params: MergeParams, upstream: UpstreamNames) -> None:
    """Method vs listed inputs (count, base), and per-model keys vs ``inputs.models``."""
    check_merge_inputs(params.method, tuple(upstream.get("models", ())), upstream.get("base"), params.models,
                       params.parameters)


@stage("merge", params=MergeParams, produces="model",
       inputs=(InputSlot("models", ("model",), many=True), InputSlot("base", ("model",), optional=True)),
       summary_metrics=("models", "parameters"), check_inputs=check_inputs)
def merge(params: MergeParams, inputs: dict, out: Path, ctx: StageContext) -> StageResult:
    """Merge the listed models (and base) with mergekit into one model."""
    started = time.monotonic()
    models: dict[str, Path] = dict(inputs["models"])
    base = inputs.get("base")
    try:
        check_inputs(params, upstream_names(inputs))
    except InputsMismatch as err:
        raise StageError(f"stage {ctx.stage!r}: {err}") from None
    paths = {**({base.name: base} if base is not None else {}), **models}
    check_weights_are_the_model(paths)
    check_compatible(paths)
    config = merge_config(params.method, list(models), base.name if base is not None else None, params.models,
                          params.parameters, params.dtype)
    ctx.info(f"{params.method} merge of {', '.join(models)}" + (f" onto {base.name}" if base is not None else ""))
    run_mergekit(config, paths, out, ctx.seed)
    (out / CONFIG_FILE).write_text(config_yaml(config, ctx.seed), encoding="utf-8")
    parameters = sum(math.prod(shape) for shape in tensor_shapes("merged", out).values())
    return StageResult(metrics={"models": len(models), "parameters": float(parameters)},
                       timings={"merge_s": time.monotonic() - started})


def run_mergekit(config: dict, paths: Mapping[str, Path], out: Path, seed: int) -> None:
    """Run mergekit's Python API on ``config`` (models named as in ``paths``), writing into ``out``.

    No model card: mergekit's names the output directory, which here is a temporary one.
    """
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    merge_config = with_paths(config, paths)
    options = MergeOptions(random_seed=seed, quiet=True, write_model_card=False, copy_tokenizer=True,
                           safe_serialization=True)
    try:
        run_merge(merge_config, str(out), options)
    finally:
        # mergekit caches a tensor index per model path for the process; an artifact rewritten at the
        # same path later (another stage run in this process, a test) must be read afresh.
        cache = LoaderCache()
        for reference in merge_config.referenced_models():
            cache.loaders.pop(reference, None)
