"""GGUF export quality on the embedded model: perplexity and greedy answers of F16/Q8_0/Q4_0/Q4_1 against fp32.

Each type is written by ``tunegraph.gguf_export``, read back by transformers (dequantized to float32)
and compared with the fp32 source on held-out chat rows (default: ``data/quickstart/eval.jsonl``):

- answer ppl: perplexity of the reference answers (what the ``evaluate`` stage reports);
- text ppl: perplexity of every token of the rendered conversations (many more tokens);
- greedy: share of prompts whose greedy answer is identical to the source's.

Run: ``.venv/bin/python -P benchmarks/gguf_quality.py [--model SPEC] [--eval FILE] [--types f16 q8_0 q4_0 q4_1]``

The embedded model's float weights are themselves a dequantized Q4_1 GGUF: Q4_1 lands on the same
grid (lossless), while Q4_0 and even Q5_0 move every weight to a different grid, which costs this
135M model far more than quantizing a float checkpoint would.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model spec (as in a recipe)")
    parser.add_argument("--eval", default=str(REPO / "data/quickstart/eval.jsonl"), help="held-out JSONL rows")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0", "q4_1"], help="GGUF types to compare")
    parser.add_argument("--prompts", type=int, default=16, help="rows answered greedily")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import torch

    from tunegraph.chat_data import read_conversations
    from tunegraph.gguf_export import export_gguf
    from tunegraph.gguf_verify import VerifySettings, source_baseline, verify_gguf
    from tunegraph.modelio import load_model, load_tokenizer
    from tunegraph.models import resolve_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, REPO)
    rows = read_conversations(args.eval)
    settings = VerifySettings(greedy_prompts=args.prompts, max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    baseline = source_baseline(load_model(model_dir), load_tokenizer(model_dir), rows, rows, settings)
    source_s = time.perf_counter() - started
    source_mib = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20

    table = [("fp32 (source)", f"{source_mib:.1f}", "safetensors F32", f"{baseline.perplexity:.4f}", "",
              f"{baseline.text_perplexity:.4f}", "", "", "", f"{source_s:.1f}")]
    with tempfile.TemporaryDirectory(prefix="gguf-quality-") as scratch:
        for gguf_type in args.types:
            started = time.perf_counter()
            exported = export_gguf(model_dir, Path(scratch) / f"model.{gguf_type}.gguf", gguf_type, name="model",
                                   stage="benchmark")
            export_s = time.perf_counter() - started
            started = time.perf_counter()
            result = verify_gguf(exported.path, baseline, rows, rows, settings)
            verify_s = time.perf_counter() - started
            kinds = " ".join(f"{kind}x{count}" for kind, count in exported.tensor_types.items())
            table.append((gguf_type, f"{exported.bytes / 2**20:.1f}", kinds, f"{result.perplexity:.4f}",
                          f"{result.ppl_delta_pct:+.3f}", f"{result.text_perplexity:.4f}",
                          f"{result.text_ppl_delta_pct:+.3f}", f"{result.greedy_match:.0%}",
                          f"{export_s:.1f}", f"{verify_s:.1f}"))
            os.remove(exported.path)

    header = ("model", "MiB", "tensor types", "answer ppl", "delta %", "text ppl", "delta %", "greedy", "export s",
              "load+eval s")
    widths = [max(len(str(row[i])) for row in (header, *table)) for i in range(len(header))]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}; model {args.model}; "
          f"{len(rows)} rows from {args.eval}; greedy on {min(args.prompts, len(rows))} prompts x "
          f"{args.max_new_tokens} tokens")
    for row in (header, *table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
