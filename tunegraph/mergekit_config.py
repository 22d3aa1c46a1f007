"""Build the mergekit configuration a merge stage runs, from the stage's params and listed inputs.

With base ``θ_0``, input models ``θ_i``, task vectors ``τ_i = θ_i − θ_0`` and weights ``w_i``, each
merged tensor is (tensor by tensor, as mergekit computes it):

- ``linear`` (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482): ``Σ w_i θ_i / Σ w_i``
  (``normalize: false``: no division). Equal weights are the uniform model soup.
- ``slerp`` (Shoemake 1985): ``sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b`` with ``cos Ω`` the cosine
  of the flattened tensors, linear interpolation when they are (anti)parallel. Two models; ``t = 0``
  gives the first listed, ``t = 1`` the second.
- ``task_arithmetic`` (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089): ``θ_0 + λ Σ w_i τ_i``;
  a negative weight subtracts a task vector (negation, "forgetting").
- ``ties`` (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each ``τ_i`` to its ``density``
  fraction of largest magnitudes (``τ̂_i``); elect the sign of ``Σ w_i τ̂_i`` per element; average the
  weighted entries that agree with it (disjoint mean: divided by the sum of their weights); add
  ``λ ×`` that to ``θ_0``.
- ``dare_linear`` (Yu et al. 2024, https://arxiv.org/abs/2311.03099): task arithmetic on DARE-sparsified
  task vectors: each element kept with probability ``density`` (seeded), the survivors rescaled so the
  tensor's L1 norm is unchanged (``rescale``).
- ``dare_ties``: TIES's sign election and disjoint mean on DARE-sparsified task vectors.
- ``model_stock`` (Jang et al. 2024, https://arxiv.org/abs/2403.19522): ``t·θ̄ + (1−t)·θ_0``, ``θ̄`` the
  mean of the models, ``t = N cos θ / (1 + (N−1) cos θ)``, ``cos θ`` the mean pairwise cosine of the
  ``τ_i``.

Parameter names are mergekit's: ``weight`` and ``density`` per model, ``t``, ``lambda``, ``normalize``,
``rescale``, ``int8_mask`` and ``filter_wise`` for the whole method (``weight`` and ``density`` there
set every model's default). A value is a number, a list of numbers interpolated across the layers,
or a list of ``{filter: <tensor-name substring>, value: ...}`` where the first matching filter wins.
``weight`` defaults to 1.0; every other parameter to mergekit's default for the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Sequence, get_args

from pydantic import ConfigDict, Field, model_validator

from tunegraph.params import StageParams
from tunegraph.registry import InputsMismatch
from tunegraph.suggest import did_you_mean

MergeMethod = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"]
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)


@dataclass(frozen=True)
class MethodRule:
    """What a method takes: which parameters, whether a base, how many models."""

    per_model: tuple[str, ...]  # parameters each model may set (models.<stage>: {...})
    shared: tuple[str, ...]  # parameters of the whole method (parameters: {...})
    needs_base: bool  # task-vector methods need the base the vectors are taken against
    min_models: int
    max_models: int | None = None

    def describe_count(self) -> str:
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        return f"at least {self.min_models}"


RULES: dict[str, MethodRule] = {
    "linear": MethodRule(("weight",), ("normalize",), needs_base=False, min_models=2),
    "slerp": MethodRule((), ("t",), needs_base=False, min_models=2, max_models=2),
    "task_arithmetic": MethodRule(("weight",), ("lambda", "normalize"), needs_base=True, min_models=1),
    "ties": MethodRule(("weight", "density"), ("lambda", "normalize", "rescale", "int8_mask"), needs_base=True,
                       min_models=1),
    "dare_linear": MethodRule(("weight", "density"), ("lambda", "normalize", "rescale"), needs_base=True,
                              min_models=1),
    "dare_ties": MethodRule(("weight", "density"), ("lambda", "normalize", "rescale", "int8_mask"),
                            needs_base=True, min_models=1),
    "model_stock": MethodRule((), ("filter_wise",), needs_base=True, min_models=2),
}


class FilteredValue(StageParams):
    """A value for the tensors whose name contains ``filter`` (no filter: every tensor)."""

    value: float | list[float]
    filter: str | None = Field(None, description="substring of tensor names, e.g. self_attn or mlp")


# A number, a gradient across layers, or per-tensor-name values (mergekit's ParameterSetting).
Setting = float | list[float] | list[FilteredValue]


def _numbers(setting: Setting | None) -> Iterator[float]:
    items = setting if isinstance(setting, list) else [] if setting is None else [setting]
    for item in items:
        if isinstance(item, FilteredValue):
            yield from _numbers(item.value)
        else:
            yield float(item)


def _check_range(name: str, setting: Setting | None, low: float, high: float) -> None:
    for number in _numbers(setting):
        if not low <= number <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {number}")


class ModelParameters(StageParams):
    """Per-model parameters (``models: {<stage>: {weight: 0.5, density: 0.7}}``)."""

    weight: Setting | None = Field(None, description="this model's weight (default 1.0); negative subtracts "
                                                     "its task vector in task_arithmetic")
    density: Setting | None = Field(None, description="ties/dare: fraction of the task vector kept (default 1.0)")

    @model_validator(mode="after")
    def _density_is_a_fraction(self):
        _check_range("density", self.density, 0.0, 1.0)
        return self

    def set_parameters(self) -> dict:
        """The parameters given in the recipe, by mergekit name, as mergekit reads them."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, include=self._given())

    def _given(self) -> set[str]:
        return {name for name in type(self).model_fields if getattr(self, name) is not None}

    def given_names(self) -> list[str]:
        fields = type(self).model_fields
        return [fields[name].alias or name for name in fields if name in self._given()]


class MethodParameters(ModelParameters):
    """Method-wide parameters (``parameters: {...}``); ``weight``/``density`` here apply to every model."""

    model_config = ConfigDict(populate_by_name=True)

    t: Setting | None = Field(None, description="slerp: 0 gives the first model, 1 the second (default 0.5)")
    lambda_: Setting | None = Field(None, alias="lambda", description="scale of the merged task vector (default 1)")
    normalize: bool | None = Field(None, description="divide by the sum of weights (linear, ties: default true)")
    rescale: bool | None = Field(None, description="dare: rescale survivors to keep the L1 norm (default true)")
    int8_mask: bool | None = Field(None, description="store sign masks as int8 (saves memory, same result)")
    filter_wise: bool | None = Field(None, description="model_stock: one t per output row instead of per tensor")

    @model_validator(mode="after")
    def _t_is_a_fraction(self):
        _check_range("t", self.t, 0.0, 1.0)
        return self


def check_merge_inputs(method: str, models: Sequence[str], base: str | None,
                       per_model: Mapping[str, ModelParameters], parameters: MethodParameters) -> None:
    """Raise :class:`InputsMismatch` (with the recipe key it concerns) when params and inputs disagree."""
    rule = RULES[method]
    count = len(models)
    if count < rule.min_models or (rule.max_models is not None and count > rule.max_models):
        raise InputsMismatch(f"{method} merges {rule.describe_count()} models; inputs.models lists {count} "
                             f"({', '.join(models)})", ("inputs", "models"))
    if rule.needs_base and base is None:
        raise InputsMismatch(f"{method} needs a base model: its task vectors are each model minus the base; "
                             f"add inputs: {{base: <stage>}}", ("inputs",))
    if not rule.needs_base and base is not None:
        what = "interpolates between the two listed models" if method == "slerp" else "averages the listed models"
        raise InputsMismatch(f"{method} {what} and takes no base; remove inputs.base (or list it under "
                             f"inputs.models)", ("inputs", "base"))
    if base is not None and base in models:
        raise InputsMismatch(f"{base!r} is both the base and one of the merged models; list it in one place",
                             ("inputs", "base"))
    for name, settings in per_model.items():
        if name not in models:
            raise InputsMismatch(f"params.models has {name!r}, which inputs.models does not list"
                                 f"{did_you_mean(name, models)}; listed: {', '.join(models)}",
                                 ("params", "models", name))
        for key in settings.given_names():
            if key not in rule.per_model:
                allowed = ", ".join(rule.per_model) or "none"
                raise InputsMismatch(f"per-model parameter {key!r} does not apply to {method} (its per-model "
                                     f"parameters: {allowed})", ("params", "models", name, key))
    for key in parameters.given_names():
        if key not in rule.shared + rule.per_model:
            allowed = ", ".join(rule.shared + rule.per_model)
            raise InputsMismatch(f"parameter {key!r} does not apply to {method} (its parameters: {allowed})",
                                 ("params", "parameters", key))


def merge_config(method: str, models: Sequence[str], base: str | None, per_model: Mapping[str, ModelParameters],
                 parameters: MethodParameters, dtype: str) -> dict:
    """The mergekit configuration as a plain dict, models named by their stage names.

    slerp's endpoints are mergekit's base (``t = 0``) and the other model (``t = 1``).
    """
    rule = RULES[method]
    shared = parameters.set_parameters()
    if method == "slerp":
        shared.setdefault("t", 0.5)
        base = models[0]
    entries = []
    for name in models:
        own = per_model[name].set_parameters() if name in per_model else {}
        if "weight" in rule.per_model and "weight" not in own and "weight" not in shared:
            own["weight"] = 1.0
        entries.append({"model": name, **({"parameters": own} if own else {})})
    config = {"merge_method": method, "models": entries, "dtype": dtype}
    if base is not None:
        config["base_model"] = base
    if shared:
        config["parameters"] = shared
    return config


def with_paths(config: dict, paths: Mapping[str, Path]):
    """A :class:`mergekit.config.MergeConfiguration` with each stage name replaced by its directory."""
    from mergekit.config import MergeConfiguration

    resolved = dict(config, models=[dict(entry, model=str(paths[entry["model"]])) for entry in config["models"]])
    if "base_model" in config:
        resolved["base_model"] = str(paths[config["base_model"]])
    return MergeConfiguration.model_validate(resolved)


def config_yaml(config: dict, seed: int) -> str:
    """The configuration as mergekit YAML, with a header saying how to run it outside tunegraph."""
    from importlib.metadata import version

    from mergekit.config import MergeConfiguration

    body = MergeConfiguration.model_validate(config).to_yaml()
    header = (f"# The mergekit {version('mergekit')} configuration this stage ran (random seed {seed}).\n"
              "# Models are named by their recipe stage; to rerun it outside tunegraph, replace each name with\n"
              f"# that stage's artifact directory and run: mergekit-yaml THIS_FILE OUT_DIR --random-seed {seed}\n")
    return header + body + "\n"
