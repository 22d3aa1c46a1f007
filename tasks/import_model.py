"""Stage kind ``import_model``: bring a base model into the DAG as a model artifact.

The artifact is a directory that ``from_pretrained`` loads directly: config, safetensors weights,
generation config and tokenizer files (chat template included) at its top level.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.models import is_local_path_spec, model_files, model_source_identity, resolve_model
from tunegraph.params import StageParams
from tunegraph.registry import StageResult, stage

# safetensors dtype codes of the dtypes this stage writes
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ImportModelParams(StageParams):
    """Which model to import and in which dtype."""

    model: str = Field(description="embedded:NAME, tiny:NAME, a local model directory or a cached hub id "
                                   "(default: the recipe's base_model)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the saved weights")

    def input_files(self) -> list[str]:
        """A local model directory is an input: its content enters the fingerprint."""
        if is_local_path_spec(self.model):
            return [str(Path(self.model).expanduser()) if self.model.startswith("~") else self.model]
        return []

    def source_identity(self) -> str:
        """Package, version and file hash for embedded models; config hash for tiny ones."""
        return model_source_identity(self.model, Path.cwd())


@stage("import_model", params=ImportModelParams, produces="model", summary_metrics=("parameters",))
def import_model(params: ImportModelParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Copy the resolved model into ``out``, re-saving the weights when the dtype differs."""
    started = time.monotonic()
    source = resolve_model(params.model, ctx.workspace)
    _require_tokenizer(source, params.model)
    if _needs_resave(source, params.dtype):
        ctx.info(f"re-saving {params.model} as {params.dtype}")
        _resave(source, out, params.dtype)
    else:
        _copy_model_files(source, out)
    metrics = {"parameters": float(count_parameters(out)), "vocab_size": float(_vocab_size(out))}
    return StageResult(metrics=metrics, timings={"import_s": time.monotonic() - started})


def count_parameters(model_dir: Path) -> int:
    """Number of stored weights, read from the safetensors headers (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _require_tokenizer(source: Path, spec: str) -> None:
    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        raise StageError(f"model {spec!r} ({source}) has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                         f"save the tokenizer next to the model with tokenizer.save_pretrained")


def _stored_dtypes(model_dir: Path) -> set[str]:
    """safetensors dtype codes of the floating-point weights in ``model_dir``."""
    from safetensors import safe_open

    codes = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            codes.update(handle.get_slice(key).get_dtype() for key in handle.keys())
    return codes & _FLOAT_CODES


def _needs_resave(source: Path, dtype: str) -> bool:
    """Re-save when weights are not safetensors or not all in ``dtype``."""
    return _stored_dtypes(source) != {_SAFETENSORS_DTYPES[dtype]}


def _copy_model_files(source: Path, out: Path) -> None:
    for path in model_files(source):
        shutil.copyfile(path, out / path.name)


def _resave(source: Path, out: Path, dtype: str) -> None:
    """Load the model in ``dtype``, save it as safetensors and copy the tokenizer files beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    written = {p.name for p in out.iterdir()}
    for path in model_files(source):
        weights = path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")
        if not weights and path.name not in written:
            shutil.copyfile(path, out / path.name)


def _vocab_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0)
