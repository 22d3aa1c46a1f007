"""Fused linear cross-entropy vs ``F.cross_entropy(h @ W.T, y)``: peak extra memory and fwd+bwd time.

Both sides run forward and backward with the hidden states and the LM head requiring grad, on the same
inputs, one after the other in this process; ``measure`` reports the peak RSS above the level before
each call (on CUDA, the peak allocated memory instead). The issue's goal: at least 60 % less peak memory
at no more than 1.2x the time.

    .venv/bin/python -P benchmarks/bench_fused_linear_ce.py            # the issue's four configurations
    .venv/bin/python -P benchmarks/bench_fused_linear_ce.py --quick    # only the SmolLM2 vocabulary

The Gemma-vocabulary baseline at 4096 rows holds several 4 GiB fp32 ``rows x V`` tensors at once
(~13 GiB); run it on a machine with room for that, and run it once (``--repeats 1``, the default).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measurement, measure, ratio  # noqa: E402

from tunegraph.kernels.fused_linear_cross_entropy import default_chunk_rows, fused_linear_cross_entropy  # noqa: E402

# (name, hidden size, vocabulary size): the LM heads of SmolLM2-135M and Gemma 3 270M
HEADS = [("smollm2", 576, 49_152), ("gemma3", 640, 262_144)]
ROWS = [1024, 4096]


@dataclass(frozen=True)
class Config:
    head: str
    hidden_size: int
    vocab_size: int
    rows: int


def make_inputs(config: Config, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(config.rows, config.hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(config.vocab_size, config.hidden_size, generator=generator) * 0.02).to(device, dtype)
    labels = torch.randint(0, config.vocab_size, (config.rows,), generator=generator).to(device)
    labels[:: 17] = -100  # a few ignored rows, as padding/prompt tokens are in real batches
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def fwd_bwd(loss_fn, hidden, weight, labels):
    """One training-step's worth of loss work: forward, backward, gradients left on the leaves."""
    hidden.grad, weight.grad = None, None
    loss = loss_fn(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def unfused(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels)


def fused(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels)


def run_measured(fn, device: str) -> Measurement:
    if device != "cuda":
        return measure(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return Measurement(time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, result)


def combine(runs: list[Measurement]) -> Measurement:
    """Fastest time, largest peak, as ``measure`` reports over repeats."""
    return Measurement(min(r.seconds for r in runs), max(r.peak_extra_bytes for r in runs), runs[-1].result)


def bench(config: Config, dtype: torch.dtype, device: str, repeats: int) -> dict:
    hidden, weight, labels = make_inputs(config, dtype, device)
    fused_runs, base_runs = [], []
    for _ in range(repeats):  # interleaved, so that a change in machine load hits both sides alike
        fused_runs.append(run_measured(lambda: fwd_bwd(fused, hidden, weight, labels), device))
        fused_grads = (hidden.grad, weight.grad)
        hidden.grad, weight.grad = None, None
        base_runs.append(run_measured(lambda: fwd_bwd(unfused, hidden, weight, labels), device))
    fused_run, base_run = combine(fused_runs), combine(base_runs)
    grad_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused_grads, (hidden.grad, weight.grad)))
    return {
        "config": config,
        "chunk_rows": default_chunk_rows(config.rows, config.hidden_size, config.vocab_size),
        "base": base_run,
        "fused": fused_run,
        "loss_diff": abs(base_run.result.item() - fused_run.result.item()),
        "grad_diff": grad_diff,
    }


def print_row(row: dict) -> None:
    config, base, fused_run = row["config"], row["base"], row["fused"]
    saved = 1.0 - fused_run.peak_extra_bytes / base.peak_extra_bytes
    print(
        f"{config.head:8} {config.hidden_size:5} {config.vocab_size:8} {config.rows:5} {row['chunk_rows']:6}"
        f" | {base.peak_extra_mib:9.0f} {fused_run.peak_extra_mib:9.0f} {saved:7.0%}"
        f" | {base.seconds:8.2f} {fused_run.seconds:8.2f} {ratio(fused_run.seconds, base.seconds):>6}"
        f" | {row['loss_diff']:.1e} {row['grad_diff']:.1e}",
        flush=True,
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the SmolLM2 head (V=49,152)")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS, help="batch x sequence sizes to run")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="hidden/head dtype")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per side: fastest time, largest peak")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    heads = HEADS[:1] if args.quick else HEADS
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"machine: {device_name}, {os.cpu_count()} CPUs, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads,"
          f" dtype {args.dtype}, backend {os.environ.get('TUNEGRAPH_KERNEL_BACKEND', 'auto')}")
    # warm-up: one-off library initialisation must not land in the first measured call
    warm = Config("warmup", 64, 1024, 64)
    bench(warm, dtype, args.device, 1)
    print(f"{'head':8} {'H':>5} {'V':>8} {'BT':>5} {'chunk':>6} | {'base MiB':>9} {'fused MiB':>9} {'saved':>7}"
          f" | {'base s':>8} {'fused s':>8} {'time':>6} | loss/grad max diff")
    for head, hidden_size, vocab_size in heads:
        for rows in args.rows:
            print_row(bench(Config(head, hidden_size, vocab_size, rows), dtype, args.device, args.repeats))


if __name__ == "__main__":
    main()
