"""tunegraph vs TRL: SFT-LoRA and DPO-LoRA on the same model, data, batch and steps.

Baselines: TRL's ``SFTTrainer`` (prompt-completion data, completion-only loss) and ``DPOTrainer``
(reference = the adapter switched off, as in tunegraph), both with peft LoRA r=16, alpha=32 on all
linear layers, fp32, batch 4, max length 256, the same number of optimizer steps and torch threads.

Each run is a fresh child process (this script re-invoked with ``--variant``), so peak RSS is the
child's own ``ru_maxrss`` (model load included, as a user pays it) and one run's allocator state cannot
flatter the next. Throughput is training tokens (non-padding tokens of the batches) per second of the
training loop, model loading excluded; both sides see the same examples, so token counts match up to
the two tokenizations of the chat template.

    .venv/bin/python -P benchmarks/bench_vs_trl.py [--steps 8] [--model embedded:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH, MAX_LENGTH, LR, SEED, THREADS = 4, 256, 2e-4, 7, 2


def quickstart_rows(n: int) -> list[dict]:
    lines = (REPO / "data/quickstart/train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def prepare(workdir: Path, model_spec: str, n: int) -> dict[str, Path]:
    """The base model and datasets as tunegraph artifacts (the TRL runs read the same files)."""
    from tunegraph.context import StageContext, seed_everything
    from tunegraph.tasks.import_model import ImportModelParams, import_model
    from tunegraph.tasks.load_dataset import LoadDatasetParams, load_dataset

    seed_everything(SEED, THREADS)
    ctx = StageContext(stage="prepare", seed=SEED, threads=THREADS, workspace=workdir)
    rows = quickstart_rows(n)
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": rows[(i + 5) % n]["output"]}
             for i, r in enumerate(rows)]
    (workdir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    paths = {"model": workdir / "model", "sft": workdir / "sft", "pairs": workdir / "pairs"}
    for path in paths.values():
        path.mkdir(exist_ok=True)
    import_model(ImportModelParams(model=model_spec), {}, paths["model"], ctx)
    load_dataset(LoadDatasetParams(path=str(workdir / "sft.jsonl")), {}, paths["sft"], ctx)
    load_dataset(LoadDatasetParams(path=str(workdir / "pairs.jsonl")), {}, paths["pairs"], ctx)
    return paths


def run_tunegraph(kind: str, paths: dict[str, Path], steps: int) -> dict:
    from tunegraph.context import StageContext, seed_everything
    from tunegraph.tasks.preference import DPOParams
    from tunegraph.tasks.preference import train_preference
    from tunegraph.tasks.sft import SFTParams, sft

    seed_everything(SEED, THREADS)
    out = Path(tempfile.mkdtemp())
    ctx = StageContext(stage=kind, seed=SEED, threads=THREADS, workspace=out)
    common = dict(strategy="lora", max_steps=steps, batch_size=BATCH, learning_rate=LR, max_length=MAX_LENGTH,
                  warmup_ratio=0.0)
    started = time.perf_counter()
    if kind == "sft":
        result = sft(SFTParams(**common), {"model": paths["model"], "dataset": paths["sft"]}, out, ctx)
    else:
        result = train_preference("dpo", DPOParams(beta=0.1, **common),
                                  {"model": paths["model"], "dataset": paths["pairs"]}, out, ctx)
    # wall: load, encode, reference log-probs (DPO), train, merge and save the model
    return {"wall": time.perf_counter() - started, "loop": result.timings["train_seconds"],
            "tokens": int(result.metrics["tokens"])}


def run_trl(kind: str, paths: dict[str, Path], steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    wall_started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in (paths[kind if kind == "sft" else "pairs"].parent /
                                          ("sft.jsonl" if kind == "sft" else "pairs.jsonl")).read_text().splitlines()]
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
                  learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, report_to=[],
                  save_strategy="no", seed=SEED, data_seed=SEED, use_cpu=True, dataloader_num_workers=0,
                  max_length=MAX_LENGTH, disable_tqdm=True)
    tokens = {"n": 0}
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                                   "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(completion_only_loss=True, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=lora)
    original = trainer.training_step

    def counting_step(model, inputs, *args, **kwargs):
        for key in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask"):
            if key in inputs:
                tokens["n"] += int(inputs[key].sum())
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = counting_step
    started = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - started
    # wall: load, tokenize, train (the adapter is not saved: TRL's save is left out, in its favour)
    return {"wall": time.perf_counter() - wall_started, "loop": loop, "tokens": tokens["n"]}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(next(line.split()[1] for line in handle if line.startswith(field + ":")))


def child(args: argparse.Namespace) -> None:
    paths = {name: Path(args.workdir) / name for name in ("model", "sft", "pairs")}
    engine, kind = args.variant.split("-")
    result = (run_tunegraph if engine == "tunegraph" else run_trl)(kind, paths, args.steps)
    result["peak_rss_mib"] = _status_kib("VmHWM") / 1024  # this process's peak RSS, model load included
    print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, workdir: Path, steps: int) -> dict:
    command = [sys.executable, "-P", __file__, "--variant", variant, "--workdir", str(workdir), "--steps", str(steps)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise SystemExit(f"{variant} failed with exit code {proc.returncode}")
    stdout = proc.stdout
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    workdir = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    prepare(workdir, args.model, args.examples)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {THREADS}; model {args.model}; "
          f"batch {BATCH}, max_length {MAX_LENGTH}, {args.steps} steps, LoRA r=16 all-linear, fp32")
    rows = []
    for kind in ("sft", "dpo"):
        figures = {}
        for engine in ("trl", "tunegraph"):
            result = run_child(f"{engine}-{kind}", workdir, args.steps)
            result["tokens_per_s"] = result["tokens"] / result["loop"]
            result["wall_tokens_per_s"] = result["tokens"] / result["wall"]
            figures[engine] = result
        rows.append((kind, figures))
    print("loop = the training loop alone (tunegraph's DPO reference log-probs are computed before it);\n"
          "wall = from model load to the end of training (tunegraph's also merges and saves the model)")
    print(f"{'objective':<10}{'engine':<11}{'tokens':>8}{'loop s':>8}{'loop tok/s':>11}{'wall s':>8}"
          f"{'wall tok/s':>11}{'peak RSS MiB':>14}")
    for kind, figures in rows:
        for engine, r in figures.items():
            print(f"{kind:<10}{engine:<11}{r['tokens']:>8}{r['loop']:>8.1f}{r['tokens_per_s']:>11.1f}"
                  f"{r['wall']:>8.1f}{r['wall_tokens_per_s']:>11.1f}{r['peak_rss_mib']:>14.0f}")
        t, b = figures["tunegraph"], figures["trl"]
        print(f"{kind:<10}{'ratio':<11}{'':>8}{'':>8}{t['tokens_per_s'] / b['tokens_per_s']:>10.2f}x{'':>8}"
              f"{t['wall_tokens_per_s'] / b['wall_tokens_per_s']:>10.2f}x"
              f"{t['peak_rss_mib'] / b['peak_rss_mib']:>13.2f}x   (tunegraph / TRL)")


if __name__ == "__main__":
    main()
