"""Stage kind ``merge_adapter``: merge a trained adapter into a full-precision base, and check the result.

LoRA/DoRA/IA3 adapters merge exactly into the weights (``W = W0 + (alpha/r) B A``; DoRA and IA3 as in
:mod:`tunegraph.training.strategies.peft_methods`). A QLoRA adapter was trained against the 4-bit NF4
base, so it is merged into a float32 rebuild of that base, never into the 4-bit weights:
``qlora.merge_into: dequantized`` (default) uses the dequantized NF4 weights the adapter saw, so the
merged model computes what the adapter model computed; ``original`` uses the float weights the base
was quantized from. Prompt-style adapters (prefix/prompt/p-tuning, marked by ``requires_adapter.json``)
live in the input sequence or the attention cache, not in any weight: refused.

The check: both the adapter model (base + unmerged adapter, 4-bit for QLoRA) and the merged model run
on a few fixed probe texts, and the stage fails when

    max |logits_merged − logits_adapter| > tolerance     (default 1e-3)

over every probe token and vocabulary entry. A float32 merge lands around 1e-5 (summation order);
the number is reported as the metric ``max_abs_logit_diff``. With ``merge_into: original`` the
reference is the float base + adapter, and the distance to the 4-bit adapter model (the quantization
error) is reported as ``logit_diff_vs_4bit``.

Inputs: ``base`` (a model artifact) and ``adapter`` (a model artifact holding ``adapter/``, as the
training stages write). ``adapter_trained_on: auto`` reads the training stage's manifest: strategy
``qlora`` means a 4-bit base, with the quantization settings it recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.hashing import MANIFEST_NAME
from tunegraph.merge_checks import check_compatible
from tunegraph.modelio import load_model
from tunegraph.models import model_files
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.training.strategies import REQUIRES_ADAPTER_FILE, QLoraSettings
from tunegraph.training.strategies.peft_methods import load_4bit, merge_qlora

REPORT_FILE = "merge_adapter.json"
ADAPTER_DIR = "adapter"
# Fixed probes: prose, code, arithmetic, an instruction; a few dozen tokens in all.
PROBES = ("The capital of France is", "def fibonacci(n):\n    return", "Question: what is 12 times 7?\nAnswer:",
          "Translate to German: good morning, how are you?")
_WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


class MergeAdapterParams(StageParams):
    adapter_trained_on: Literal["auto", "float", "4bit"] = Field(
        "auto", description="the base the adapter was trained against; auto: the training stage's manifest says "
                            "(strategy qlora -> 4bit), float when there is none")
    qlora: QLoraSettings | None = Field(None, description="4bit: quantization and merge_into; default: what the "
                                                          "training stage recorded, else qlora's defaults")
    tolerance: float = Field(1e-3, gt=0, description="largest allowed |logit difference| merged vs adapter model")


@stage("merge_adapter", params=MergeAdapterParams, produces="model",
       inputs=(InputSlot("base", ("model",)), InputSlot("adapter", ("model",))),
       summary_metrics=("max_abs_logit_diff",))
def merge_adapter(params: MergeAdapterParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Merge an adapter (LoRA, DoRA, IA3, QLoRA) into the full-precision base; check logits match."""
    from peft import PeftConfig

    base, artifact = inputs["base"], inputs["adapter"]
    adapter_dir = _adapter_dir(artifact)
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    if (artifact / REQUIRES_ADAPTER_FILE).is_file() or peft_config.is_prompt_learning:
        raise StageError(f"stage {ctx.stage!r}: the adapter in {artifact} is {peft_config.peft_type.value}, a "
                         f"prompt-style adapter: it adds virtual tokens, not weights, so it cannot be merged; "
                         f"use the artifact as it is (evaluate loads its adapter)")
    if (artifact / "config.json").is_file():  # the training artifact's own model: same network as the base?
        check_compatible({"base": base, "adapter": artifact})
    trained_on, qlora = _training_base(params, artifact)
    ctx.info(f"merging a {peft_config.peft_type.value} adapter trained on a {trained_on} base"
             + (f" into the {qlora.merge_into} weights" if trained_on == "4bit" else ""))

    probes = _probe_inputs(base)
    metrics: dict[str, float] = {}
    if trained_on == "4bit":
        adapter_model = _with_adapter(load_4bit(base, qlora), adapter_dir)  # load_4bit keeps the trained layout
        merged = merge_qlora(adapter_model, base, qlora).eval()  # dequantizes: before any forward, see below
        quantized_logits = _logits(adapter_model, probes)
        del adapter_model
        if qlora.merge_into == "original":  # the claim is "original + adapter": check that one
            reference = _logits(_with_adapter(load_model(base), adapter_dir), probes)
            metrics["logit_diff_vs_4bit"] = _max_abs_diff(_logits(merged, probes), quantized_logits)
        else:
            reference = quantized_logits
    else:
        adapter_model = _with_adapter(load_model(base), adapter_dir)
        reference = _logits(adapter_model, probes)
        merged = adapter_model.merge_and_unload().eval()
    diff = _max_abs_diff(_logits(merged, probes), reference)
    metrics.update({"max_abs_logit_diff": diff, "probe_tokens": float(sum(p.shape[1] for p in probes))})
    if not diff <= params.tolerance:
        raise StageError(f"stage {ctx.stage!r}: the merged model's logits differ from the adapter model's by up to "
                         f"{diff:.3g} (tolerance {params.tolerance:g}): the merged weights do not reproduce base + "
                         f"adapter; if that is rounding (a bfloat16 base), raise tolerance")

    merged.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(base, out)
    report = {"peft_type": peft_config.peft_type.value, "adapter_trained_on": trained_on,
              "merge_into": qlora.merge_into if trained_on == "4bit" else "float", "tolerance": params.tolerance,
              "probes": list(PROBES), **metrics}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return StageResult(metrics=metrics)


def _adapter_dir(artifact: Path) -> Path:
    for candidate in (artifact / ADAPTER_DIR, artifact):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise StageError(f"{artifact} holds no adapter ({ADAPTER_DIR}/adapter_config.json): it was trained with a "
                     f"strategy that updates the weights themselves (full, galore, spectrum), so there is nothing "
                     f"to merge; use it as a model")


def _training_base(params: MergeAdapterParams, artifact: Path) -> tuple[str, QLoraSettings]:
    """('float' | '4bit', quantization settings): from the params, else the training stage's manifest."""
    recorded = {}
    manifest = artifact / MANIFEST_NAME
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("params", {})
    trained_on = params.adapter_trained_on
    if trained_on == "auto":
        trained_on = "4bit" if recorded.get("strategy") == "qlora" else "float"
    qlora = params.qlora or QLoraSettings.model_validate(recorded.get("qlora") or {})
    return trained_on, qlora


def _with_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def _probe_inputs(base: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return [tokenizer(text, return_tensors="pt")["input_ids"] for text in PROBES]


@torch.no_grad()
def _logits(model, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits.float() for ids in probes]


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _copy_tokenizer(base: Path, out: Path) -> None:
    """The base's tokenizer files as they are (chat template included); weights and config came from the merge."""
    for path in model_files(base):
        if path.suffix != ".safetensors" and path.name not in _WEIGHT_FILES and not (out / path.name).exists():
            shutil.copyfile(path, out / path.name)
