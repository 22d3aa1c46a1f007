"""Stage kind ``quantize_bnb``: a bitsandbytes 4-bit (NF4/FP4) or 8-bit (LLM.int8()) checkpoint, reloaded and checked.

- ``nf4`` / ``fp4``: every Linear of the decoder stored in 4 bits per weight, one absmax scale per block
  of 64 (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314); with ``double_quant`` the
  scales are themselves quantized to 8 bits. Compute in float32.
- ``int8``: LLM.int8() (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339): int8 weights with a
  per-row scale; activation columns above ``int8_threshold`` are multiplied in 16-bit instead.

Embeddings and the LM head stay float32 (transformers' bitsandbytes integration skips them). The
artifact is a ``from_pretrained`` directory (``config.json`` carries the ``quantization_config``) with
the tokenizer, so ``evaluate`` loads it as is. The stage reloads what it saved and reports the
quantized modules, the memory footprint, the logit error on sample texts against the source, and,
given an eval dataset, the perplexity delta; ``max_ppl_delta_pct`` turns that into a check.

bitsandbytes' CPU backend repacks 4-bit weights on load and keeps the block scales in bfloat16; saving
re-quantizes them, so a reloaded 4-bit model can differ slightly from the one quantized in memory.
The checks therefore run on the reloaded checkpoint, which is what later stages get.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunegraph.chat_data import read_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.modelio import load_model, load_tokenizer
from tunegraph.models import model_files
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage

CHECK_TEXTS = ("The capital of France is Paris.", "def add(a, b):\n    return a + b",
               "Quantization keeps most of the model's accuracy at a fraction of the memory.")


class QuantizeBnbParams(StageParams):
    mode: Literal["nf4", "fp4", "int8"] = Field("nf4", description="4-bit NormalFloat/Float, or LLM.int8()")
    double_quant: bool = Field(True, description="4-bit: quantize the per-block scales too")
    int8_threshold: float = Field(6.0, ge=0, description="int8: outlier threshold on activation magnitude")
    max_ppl_delta_pct: float | None = Field(None, ge=0, description="fail when |perplexity delta| exceeds this "
                                                                     "(needs an eval dataset)")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1, description="perplexity on the first N eval rows only")


@stage("quantize_bnb", params=QuantizeBnbParams, produces="model",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",), optional=True)),
       summary_metrics=("quantized_modules", "footprint_mib", "ppl_delta_pct"))
def quantize_bnb(params: QuantizeBnbParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Quantize with bitsandbytes, save, reload and compare with the source model."""
    model_dir = inputs["model"]
    _check_quantizable(model_dir, ctx.stage)
    started = time.monotonic()
    with _quiet_int8():
        quantized = _load_quantized(model_dir, params)
        quantized.save_pretrained(out, safe_serialization=True)
        _copy_tokenizer_files(model_dir, out)
        del quantized
        timings = {"quantize_s": time.monotonic() - started}

        started = time.monotonic()
        reloaded = load_model(out)  # what a later stage gets: config.json's quantization_config applies
        metrics = _compare(load_model(model_dir), reloaded, load_tokenizer(model_dir), params,
                           read_rows(inputs["dataset"])[: params.limit] if "dataset" in inputs else [])
    timings["check_s"] = time.monotonic() - started
    if metrics["quantized_modules"] == 0:
        raise StageError(f"stage {ctx.stage!r}: the reloaded checkpoint has no bitsandbytes layers; "
                         f"the quantization did not apply to this model")
    delta = metrics.get("ppl_delta_pct")
    if params.max_ppl_delta_pct is not None and delta is not None and abs(delta) > params.max_ppl_delta_pct:
        raise StageError(f"stage {ctx.stage!r}: {params.mode} perplexity {metrics['perplexity']:.4f} is {delta:+.2f}% "
                         f"from the source's {metrics['source_perplexity']:.4f} (limit {params.max_ppl_delta_pct}%: "
                         f"max_ppl_delta_pct)")
    ctx.info(f"{params.mode}: {int(metrics['quantized_modules'])} quantized layers, footprint "
             f"{metrics['footprint_mib']:.1f} MiB (source {metrics['source_footprint_mib']:.1f} MiB), "
             f"logit max error {metrics['logit_max_abs_error']:.4g}")
    return StageResult(metrics=metrics, timings=timings)


def _check_quantizable(model_dir: Path, stage_name: str) -> None:
    import json

    from tunegraph.training.strategies import REQUIRES_ADAPTER_FILE

    if (model_dir / REQUIRES_ADAPTER_FILE).is_file():
        raise StageError(f"stage {stage_name!r}: {model_dir} holds a prompt-style adapter ({REQUIRES_ADAPTER_FILE}); "
                         f"a quantized checkpoint would drop it; quantize a model trained with a mergeable strategy")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise StageError(f"stage {stage_name!r}: {model_dir} is not a model artifact (no config.json)")
    existing = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    if existing:
        raise StageError(f"stage {stage_name!r}: {model_dir} is already quantized "
                         f"({existing.get('quant_method', '?')}); quantize the float model")


def _load_quantized(model_dir: Path, params: QuantizeBnbParams):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunegraph.training.strategies.peft_methods import QLoraSettings, load_4bit

    if params.mode in ("nf4", "fp4"):
        return load_4bit(model_dir, QLoraSettings(quant_type=params.mode, double_quant=params.double_quant))
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=params.int8_threshold)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model.config._name_or_path = ""  # no absolute paths in the saved config (as modelio.load_model)
    return model


def _copy_tokenizer_files(model_dir: Path, out: Path) -> None:
    """The source's tokenizer and chat template files, byte for byte (save_pretrained wrote the rest)."""
    for path in model_files(model_dir):
        if not (out / path.name).exists() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(path, out / path.name)


def _quantized_modules(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _compare(source, quantized, tokenizer, params: QuantizeBnbParams, rows: list[dict]) -> dict[str, float]:
    """Footprints, logit error on :data:`CHECK_TEXTS` (max |diff| / max |source logit|) and perplexities."""
    import torch

    from tunegraph.tasks.evaluate import reference_loss

    errors, scales = [], []
    with torch.no_grad():
        for text in CHECK_TEXTS:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            reference, candidate = source(input_ids=ids).logits.float(), quantized(input_ids=ids).logits.float()
            errors.append((candidate - reference).abs().max().item())
            scales.append(reference.abs().max().item())
    metrics = {"quantized_modules": float(_quantized_modules(quantized)),
               "footprint_mib": quantized.get_memory_footprint() / 2**20,
               "source_footprint_mib": source.get_memory_footprint() / 2**20,
               "logit_max_abs_error": max(errors), "logit_max_rel_error": max(errors) / max(max(scales), 1e-12)}
    if rows:
        source_ppl = math.exp(reference_loss(source, tokenizer, rows, params.max_length, params.batch_size))
        ppl = math.exp(reference_loss(quantized, tokenizer, rows, params.max_length, params.batch_size))
        metrics.update({"source_perplexity": source_ppl, "perplexity": ppl,
                        "ppl_delta_pct": 100.0 * (ppl - source_ppl) / source_ppl})
    return metrics


@contextmanager
def _quiet_int8():
    """bitsandbytes warns on every int8 matmul that float32 inputs are cast to float16; once is enough."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")
        yield
