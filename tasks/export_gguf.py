"""Stage kind ``export_gguf``: a llama model as GGUF files (F16, Q8_0, Q4_0, Q4_1; Q4_K_M with llama.cpp), verified.

For each type in ``types`` the stage writes ``<name>.<type>.gguf`` (:mod:`tunegraph.gguf_export`) and an
Ollama ``<name>.<type>.Modelfile`` beside it, reads the file back with transformers and compares it
with the source model (:mod:`tunegraph.gguf_verify`): tokenizer ids and chat template, greedy answers,
and, given an eval dataset, the perplexity delta ``100 * (ppl_gguf - ppl_source) / ppl_source``.

The stage fails when a file's |delta| exceeds ``max_ppl_delta_pct`` for its type (defaults: 0.5 % for
F16, 1 % for Q8_0, 10 % for Q4_0 and Q4_1, 5 % for Q4_K_M), when its greedy match rate falls below
``min_greedy_match`` (defaults: all answers identical for F16 and Q8_0; 4-bit types are reported
only), or when the tokenizer or chat template did not survive the round trip. Q4_K_M needs llama.cpp's
``llama-quantize`` on PATH (run on the F16 file); without it Q4_K_M is reported as skipped.

The artifact holds the files, their Modelfiles, ``gguf_report.json`` (tensor types per file, answers,
perplexities) and the model card, ``README.md`` and ``lineage.json`` (:mod:`tunegraph.model_card`): the
directory is what one publishes. The card is this export's: every ancestor of the source model (data
rows and hashes, base, adapters, merge config), the files with their quantization, and the read-back
checks above, which are the GGUF node's evaluation (the files are no ``from_pretrained`` directory, so
the artifact is typed ``eval`` and no ``evaluate`` stage takes it). The ``evals`` input adds the scores of
evaluate stages, e.g. of the source model and its ancestors, to the card; the card is written only
once every check has passed.

On the embedded SmolLM2-135M (quickstart eval answers, ``benchmarks/gguf_quality.py``): F16 +0.08 %,
Q8_0 +0.75 %, Q4_0 +73 % (its float weights are a dequantized Q4_1 file, so Q4_0 re-grids every
weight; Q4_1 is lossless there). With the default limits a Q4_0 export of that model fails: export
``q4_1``, or raise ``max_ppl_delta_pct.q4_0`` knowingly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tunegraph.chat_data import read_rows
from tunegraph.code_version import code_version
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.gguf_export import (DIRECT_TYPES, ExportedFile, check_exportable, export_gguf, read_tokenizer_metadata,
                                   write_modelfile)
from tunegraph.gguf_verify import DEFAULT_PROMPT_ROWS, VerifySettings, source_baseline, verify_gguf
from tunegraph.model_card import running_node, write_model_card
from tunegraph.modelio import load_model, load_tokenizer
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage

GGUFType = Literal["f16", "q8_0", "q4_0", "q4_1", "q4_k_m"]
QUANTIZE_BINARY = "llama-quantize"
REPORT_FILE = "gguf_report.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PerplexityLimits(StageParams):
    """Largest |perplexity delta| in percent against the source, per type (checked with an eval dataset)."""

    f16: float = Field(0.5, ge=0)
    q8_0: float = Field(1.0, ge=0)
    q4_0: float = Field(10.0, ge=0)
    q4_1: float = Field(10.0, ge=0)
    q4_k_m: float = Field(5.0, ge=0)


class GreedyLimits(StageParams):
    """Smallest share of greedy answers identical to the source's, per type (4-bit: reported only)."""

    f16: float = Field(1.0, ge=0, le=1)
    q8_0: float = Field(1.0, ge=0, le=1)
    q4_0: float = Field(0.0, ge=0, le=1)
    q4_1: float = Field(0.0, ge=0, le=1)
    q4_k_m: float = Field(0.0, ge=0, le=1)


class ExportGGUFParams(StageParams):
    types: list[GGUFType] = Field(["f16", "q8_0", "q4_0"], min_length=1, description="GGUF types to write")
    name: str | None = Field(None, description="file stem: <name>.<type>.gguf (default: the stage name)")
    max_ppl_delta_pct: PerplexityLimits = Field(default_factory=PerplexityLimits)
    min_greedy_match: GreedyLimits = Field(default_factory=GreedyLimits)
    greedy_prompts: int = Field(8, ge=1, description="eval rows whose prompts are answered greedily")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1, description="perplexity on the first N eval rows only")
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name (default: detected)")
    title: str | None = Field(None, description="the model card's heading (default: the file stem)")
    license: str = Field("unknown", description="license id for the model card's header")

    @field_validator("types")
    @classmethod
    def _unique(cls, types: list[str]) -> list[str]:
        if len(set(types)) != len(types):
            raise ValueError(f"types lists a type twice: {types}")
        return types

    @field_validator("name")
    @classmethod
    def _file_stem(cls, name: str | None) -> str | None:
        if name is not None and not _NAME.match(name):
            raise ValueError(f"name {name!r} must be a file stem: letters, digits, '.', '_' or '-'")
        return name


@stage("export_gguf", params=ExportGGUFParams, produces="eval",
       inputs=(InputSlot("model", ("model",)), InputSlot("dataset", ("dataset",), optional=True),
               InputSlot("evals", ("eval",), optional=True, many=True)),
       summary_metrics=("q8_0_ppl_delta_pct", "q4_0_ppl_delta_pct", "q8_0_greedy_match"))
def export_gguf_stage(params: ExportGGUFParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Write, read back and check one GGUF per requested type."""
    model_dir = inputs["model"]
    check_exportable(model_dir, ctx.stage)  # refuse before loading anything
    name = params.name or ctx.stage
    eval_rows = read_rows(inputs["dataset"])[: params.limit] if "dataset" in inputs else []
    prompt_rows = eval_rows or list(DEFAULT_PROMPT_ROWS)
    settings = VerifySettings(params.greedy_prompts, params.max_new_tokens, params.batch_size, params.max_length)

    started = time.monotonic()
    tokenizer = load_tokenizer(model_dir)
    baseline = source_baseline(load_model(model_dir), tokenizer, eval_rows, prompt_rows, settings)
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {"source_s": time.monotonic() - started}
    if baseline.perplexity is not None:
        metrics.update(source_perplexity=baseline.perplexity, source_text_perplexity=baseline.text_perplexity)
    report: dict = {"name": name, "source_answers": baseline.answers, "files": {}}

    for gguf_type in params.types:
        started = time.monotonic()
        exported = _write_file(gguf_type, name, model_dir, out, ctx, params)
        if exported is None:
            metrics[f"{gguf_type}_skipped"] = 1.0
            report["files"][gguf_type] = {"skipped": f"no {QUANTIZE_BINARY} on PATH (llama.cpp builds it)"}
            continue
        modelfile, translated = write_modelfile(exported, tokenizer)
        timings[f"{gguf_type}_export_s"] = time.monotonic() - started
        started = time.monotonic()
        result = verify_gguf(exported.path, baseline, eval_rows, prompt_rows, settings)
        timings[f"{gguf_type}_verify_s"] = time.monotonic() - started
        entry = {"file": exported.path.name, "modelfile": modelfile.name, "bytes": exported.bytes,
                 "tensor_types": exported.tensor_types, "stop_tokens": exported.stop_tokens,
                 "template_translated": translated, **dataclasses.asdict(result)}
        report["files"][gguf_type] = entry
        metrics.update(_file_metrics(gguf_type, entry))
        ctx.info(f"{exported.path.name}: {exported.bytes / 2**20:.1f} MiB, tensors {exported.tensor_types}, "
                 f"greedy match {result.greedy_match:.0%}"
                 + (f", perplexity {result.perplexity:.4f} ({result.ppl_delta_pct:+.3f}%)"
                    if result.ppl_delta_pct is not None else ""))

    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    _check_limits(report["files"], params, ctx.stage)
    _write_card(params, inputs, out, ctx, name, metrics, report["files"], len(eval_rows))
    return StageResult(metrics=metrics, timings=timings)


def _write_card(params: ExportGGUFParams, inputs: dict, out: Path, ctx: StageContext, name: str,
                metrics: dict[str, float], files: dict, eval_rows: int) -> None:
    """README.md and lineage.json beside the files: the source model's lineage, then this export."""
    types = [t for t in params.types if "skipped" not in files[t]]
    me = running_node(ctx.stage, "export_gguf", params.fingerprint_params(), inputs, artifact_type="eval",
                      seed=ctx.seed, threads=ctx.threads, code_version=code_version(export_gguf_stage.__module__),
                      metrics=metrics, details={"quantization": {"format": "gguf", "types": types}})
    checked = (f"`{inputs['dataset'].name}` ({eval_rows} rows, {min(params.greedy_prompts, eval_rows)} greedy "
               f"prompts)" if "dataset" in inputs else f"{len(DEFAULT_PROMPT_ROWS)} built-in prompts, no perplexity")
    exports = {}
    for gguf_type, entry in files.items():
        if "skipped" in entry:
            exports[f"{name}.{gguf_type}.gguf"] = {"type": gguf_type, "skipped": entry["skipped"]}
            continue
        exports[entry["file"]] = {
            "type": gguf_type, "MiB": round(entry["bytes"] / 2**20, 2), "tensor types": entry["tensor_types"],
            "Modelfile": entry["modelfile"], "checked on": checked, "greedy match vs source": entry["greedy_match"],
            **{label: entry[key] for key, label in (("perplexity", "perplexity"), ("ppl_delta_pct", "ppl delta %"),
                                                     ("text_ppl_delta_pct", "text ppl delta %"))
               if entry[key] is not None}}
    write_model_card(inputs["model"], out, title=params.title or name, license=params.license,
                     evals=dict(inputs.get("evals", {})), exports=exports, running=me)


def _file_metrics(gguf_type: str, entry: dict) -> dict[str, float]:
    """The deterministic numbers of one file's report entry, as ``<type>_<name>`` metrics."""
    metrics = {f"{gguf_type}_mib": entry["bytes"] / 2**20, f"{gguf_type}_greedy_match": entry["greedy_match"],
               f"{gguf_type}_tokenizer_mismatches": float(len(entry["tokenizer_mismatches"])),
               f"{gguf_type}_template_translated": float(entry["template_translated"])}
    for key in ("perplexity", "ppl_delta_pct", "text_perplexity", "text_ppl_delta_pct"):
        if entry[key] is not None:
            metrics[f"{gguf_type}_{key}"] = entry[key]
    return metrics


def _write_file(gguf_type: str, name: str, model_dir: Path, out: Path, ctx: StageContext,
                params: ExportGGUFParams) -> ExportedFile | None:
    """Export one type; None for Q4_K_M when llama-quantize is missing."""
    dest = out / f"{name}.{gguf_type}.gguf"
    if gguf_type in DIRECT_TYPES:
        return export_gguf(model_dir, dest, gguf_type, name=name, stage=ctx.stage, tokenizer_pre=params.tokenizer_pre)
    binary = shutil.which(QUANTIZE_BINARY)
    if binary is None:
        ctx.info(f"{gguf_type}: skipped, no {QUANTIZE_BINARY} on PATH (K-quants need llama.cpp)")
        return None
    with tempfile.TemporaryDirectory(prefix="tunegraph-gguf-") as scratch:
        f16 = out / f"{name}.f16.gguf"
        if not f16.is_file():  # the F16 file is llama-quantize's input; write one aside if not requested
            f16 = export_gguf(model_dir, Path(scratch) / "source.f16.gguf", "f16", name=name, stage=ctx.stage,
                              tokenizer_pre=params.tokenizer_pre).path
        run = subprocess.run([binary, str(f16), str(dest), gguf_type.upper()], capture_output=True, text=True)
    if run.returncode != 0:
        tail = " ".join(run.stderr.strip().splitlines()[-3:])
        raise StageError(f"stage {ctx.stage!r}: {binary} failed ({run.returncode}): {tail}")
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf.reader import GgufHeader  # reads the tensor table only: fast

    shape = check_exportable(model_dir, ctx.stage)
    stop_tokens = read_tokenizer_metadata(model_dir, shape.vocab_size, ctx.stage, params.tokenizer_pre).stop_tokens
    counts = Counter(GGMLQuantizationType(tensor.ggml_type).name for tensor in GgufHeader.from_file(str(dest)).tensors)
    return ExportedFile(dest, gguf_type, dest.stat().st_size, dict(sorted(counts.items())), stop_tokens)


def _check_limits(files: dict, params: ExportGGUFParams, stage_name: str) -> None:
    """One StageError naming every file that missed a limit."""
    problems = []
    for gguf_type, entry in files.items():
        if "skipped" in entry:
            continue
        if entry["tokenizer_mismatches"]:
            problems.append(f"{gguf_type}: the GGUF tokenizer differs on {len(entry['tokenizer_mismatches'])} sample "
                            f"text(s), e.g. {entry['tokenizer_mismatches'][0]!r}")
        if not entry["chat_template_equal"]:
            problems.append(f"{gguf_type}: the chat template read back differs from the source's")
        delta, limit = entry["ppl_delta_pct"], getattr(params.max_ppl_delta_pct, gguf_type)
        if delta is not None and abs(delta) > limit:
            problems.append(f"{gguf_type}: perplexity {entry['perplexity']:.4f} is {delta:+.2f}% from the source "
                            f"(limit {limit}%: max_ppl_delta_pct.{gguf_type})")
        floor = getattr(params.min_greedy_match, gguf_type)
        if entry["greedy_match"] < floor:
            problems.append(f"{gguf_type}: greedy answers match the source on {entry['greedy_match']:.0%} of prompts "
                            f"(need {floor:.0%}: min_greedy_match.{gguf_type})")
    if problems:
        raise StageError(f"stage {stage_name!r}: GGUF verification failed: " + "; ".join(problems))
