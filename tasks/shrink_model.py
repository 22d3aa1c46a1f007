"""Stage kind ``shrink_model``: a smaller student initialized from a model by keeping some of its decoder layers.

Layer dropping as student initialization: DistilBERT takes one layer in two of its teacher (Sanh et al.
2019, https://arxiv.org/abs/1910.01108); Minitron prunes depth and then distills (Muralidharan et al. 2024,
https://arxiv.org/abs/2407.14679). Choose the layers with ``keep_layers: [0, 2, ...]`` (indices into the
source, increasing), or ``num_layers: N`` and a ``rule``:

- ``spread`` (default): N evenly spaced layers, ``round(i (L - 1) / (N - 1))``, always the first and last;
- ``drop_middle``: the first ceil(N/2) and the last floor(N/2) layers (a contiguous middle block goes);
- ``first``: the first N layers.

The output is a ``from_pretrained`` directory: the kept layers' tensors, renumbered 0..N-1 and otherwise
byte-identical, every other tensor (embeddings, final norm, head) as it was, ``config.json`` with
``num_hidden_layers: N`` and its per-layer entries cut to the kept layers (``layer_types``, the sliding
or full attention of each layer in Gemma 3 and Qwen2, written out even where the source derived it from
``sliding_window_pattern``; ``no_rope_layers``; Qwen2's ``max_window_layers`` recounted), the tokenizer,
chat template and generation config, and ``shrink.json`` (which source layer each new layer is). The
stage reloads the result with transformers and fails unless every weight is accounted for.

Llama, Qwen2 and Gemma 3 (text) models are covered by tests; other decoder-only models whose config has
no other per-layer entries work the same way, and a config with per-layer entries this stage does not
know is refused. Shrink before quantizing or adding a prompt-style adapter.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.models import model_files
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage

SHRINK_FILE = "shrink.json"
INDEX_FILE = "model.safetensors.index.json"
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # config entries with one value per layer
# config entries about layers that need nothing, or are handled below
KNOWN_LAYER_KEYS = {"num_hidden_layers", "max_window_layers", *PER_LAYER_LISTS}
_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)\.(?P<rest>.+)$")


class ShrinkModelParams(StageParams):
    keep_layers: list[int] | None = Field(None, description="source layer indices to keep, increasing")
    num_layers: int | None = Field(None, ge=1, description="how many layers to keep, chosen by `rule`")
    rule: Literal["spread", "drop_middle", "first"] = Field("spread", description="with num_layers: evenly "
                                                            "spaced incl. first and last; drop a middle block; "
                                                            "or the first N")

    @model_validator(mode="after")
    def _one_choice(self) -> "ShrinkModelParams":
        if (self.keep_layers is None) == (self.num_layers is None):
            raise ValueError("give exactly one of keep_layers (a list of layer indices) or num_layers (with rule)")
        if self.keep_layers is not None:
            if not self.keep_layers:
                raise ValueError("keep_layers is empty; keep at least one layer")
            if any(b <= a for a, b in zip(self.keep_layers, self.keep_layers[1:])) or min(self.keep_layers) < 0:
                raise ValueError(f"keep_layers {self.keep_layers} must be increasing non-negative layer indices")
        return self


def chosen_layers(params: ShrinkModelParams, total: int, stage_name: str) -> list[int]:
    """The source layer indices to keep, increasing."""
    if params.keep_layers is not None:
        if params.keep_layers[-1] >= total:
            raise StageError(f"stage {stage_name!r}: keep_layers names layer {params.keep_layers[-1]}, but the model "
                             f"has {total} layers (0..{total - 1})")
        return list(params.keep_layers)
    n = params.num_layers
    if n > total:
        raise StageError(f"stage {stage_name!r}: num_layers={n} but the model has only {total} layers")
    if params.rule == "first":
        return list(range(n))
    if params.rule == "drop_middle":
        head = math.ceil(n / 2)
        return list(range(head)) + list(range(total - (n - head), total))
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]  # distinct: the step is >= 1 since n <= total


@stage("shrink_model", params=ShrinkModelParams, produces="model",
       inputs=(InputSlot("model", ("model",)),), summary_metrics=("layers", "parameters"))
def shrink_model(params: ShrinkModelParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Keep the chosen decoder layers of the input model, renumbered, with a consistent config."""
    source = inputs["model"]
    config = _read_config(source, ctx.stage)
    total = int(config["num_hidden_layers"])
    kept = chosen_layers(params, total, ctx.stage)
    ctx.info(f"keeping {len(kept)} of {total} layers: {kept}")
    parameters = _write_weights(source, out, kept, total, ctx.stage)
    (out / "config.json").write_text(json.dumps(shrunk_config(source, config, kept), indent=2, sort_keys=True)
                                     + "\n", encoding="utf-8")
    for path in model_files(source):
        if path.name != "config.json" and path.suffix != ".safetensors" and path.name != INDEX_FILE:
            shutil.copyfile(path, out / path.name)
    (out / SHRINK_FILE).write_text(json.dumps({"source_layers": total, "kept_layers": kept,
                                               "rule": None if params.keep_layers is not None else params.rule},
                                              indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _check_loads(out, ctx.stage)
    return StageResult(metrics={"layers": len(kept), "source_layers": total, "parameters": float(parameters)})


def _read_config(source: Path, stage_name: str) -> dict:
    if (source / "requires_adapter.json").is_file():
        raise StageError(f"stage {stage_name!r}: {source.name} is a base plus a prompt-style adapter; shrink the "
                         f"base model, then train the adapter on the shrunk one")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise StageError(f"stage {stage_name!r}: {source.name} is quantized; shrink the float model, then quantize")
    if "num_hidden_layers" not in config:
        nested = "; it nests a text_config (a multimodal model): shrink its text model" if "text_config" in config \
            else ""
        raise StageError(f"stage {stage_name!r}: {source.name}/config.json has no num_hidden_layers{nested}")
    unknown = sorted(key for key, value in config.items()
                     if "layers" in key and key not in KNOWN_LAYER_KEYS and value not in (None, [], 0, False))
    if unknown:
        raise StageError(f"stage {stage_name!r}: config.json has per-layer settings this stage does not know how to "
                         f"cut ({', '.join(unknown)}); pass a llama, qwen2 or gemma3 text model")
    return config


def shrunk_config(source: Path, config: dict, kept: list[int]) -> dict:
    """``config`` for the kept layers. Per-layer lists come from transformers' resolved config, which fills
    ``layer_types`` from ``sliding_window_pattern`` / ``max_window_layers`` when the file has none: written
    out, they stay the kept layers' own types after renumbering."""
    from transformers import AutoConfig

    resolved = AutoConfig.from_pretrained(source).to_dict()
    total = int(config["num_hidden_layers"])
    shrunk = dict(config, num_hidden_layers=len(kept))
    for key in PER_LAYER_LISTS:
        values = resolved.get(key) or config.get(key)
        if values:
            if len(values) != total:
                raise ValueError(f"{key} has {len(values)} entries for {total} layers")
            shrunk[key] = [values[i] for i in kept]
    if "max_window_layers" in config:  # Qwen2: layers below this index use full attention
        shrunk["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    return shrunk


def _weight_files(source: Path) -> list[str]:
    index = source / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return sorted(p.name for p in source.glob("*.safetensors"))


def _layer_prefix(names: list[str], total: int, stage_name: str) -> str:
    """The key prefix of the decoder layers (``model.layers.``): the one whose indices are exactly 0..L-1."""
    indices: dict[str, set[int]] = {}
    for name in names:
        match = _LAYER_KEY.match(name)
        if match:
            indices.setdefault(match["prefix"], set()).add(int(match["index"]))
    candidates = [prefix for prefix, found in indices.items() if found == set(range(total))]
    if len(candidates) != 1:
        raise StageError(f"stage {stage_name!r}: cannot tell the decoder layers' weights apart (prefixes with "
                         f"{total} layers: {candidates or 'none'})")
    return candidates[0]


def _write_weights(source: Path, out: Path, kept: list[int], total: int, stage_name: str) -> int:
    """Copy every tensor but the dropped layers', renaming kept layer i to its new index; returns the count
    of stored weights. Shards keep their names (those left empty are dropped) and the index is rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = _weight_files(source)
    names = []
    for file in files:
        with safe_open(str(source / file), framework="pt") as handle:
            names += list(handle.keys())
    prefix = _layer_prefix(names, total, stage_name)
    new_index = {old: new for new, old in enumerate(kept)}
    weight_map, parameters, total_bytes = {}, 0, 0
    for file in files:
        tensors = {}
        with safe_open(str(source / file), framework="pt") as handle:
            metadata = handle.metadata()
            for name in handle.keys():
                renamed = _renamed(name, prefix, new_index)
                if renamed is not None:
                    tensors[renamed] = handle.get_tensor(name)
        if not tensors:
            continue
        save_file(tensors, str(out / file), metadata=metadata)
        for name, tensor in tensors.items():
            weight_map[name] = file
            parameters += tensor.numel()
            total_bytes += tensor.numel() * tensor.element_size()
    if (source / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return parameters


def _renamed(name: str, prefix: str, new_index: dict[int, int]) -> str | None:
    """The tensor's name in the shrunk model, or None when its layer is dropped."""
    match = _LAYER_KEY.match(name)
    if not match or match["prefix"] != prefix:
        return name
    index = int(match["index"])
    return f"{prefix}{new_index[index]}.{match['rest']}" if index in new_index else None


def _check_loads(out: Path, stage_name: str) -> None:
    """transformers loads the result with no missing, unexpected or misshapen weight."""
    import torch
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    problems = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        raise StageError(f"stage {stage_name!r}: the shrunk model does not load cleanly: "
                         + "; ".join(f"{kind}: {', '.join(map(str, names[:4]))}" for kind, names in problems.items()))
