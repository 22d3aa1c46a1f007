"""Fused, chunked preference losses vs the naive path: peak extra memory and fwd+bwd time, as ratios.

The naive path is the trainer's (``tunegraph.training.preference.make_preference_step``): the LM head
over every position, ``sequence_logps``, then the objective; the fused path is
``fused_linear_preference_loss`` on the same hidden states, head and labels. Both run forward and
backward with the hidden states and the head requiring grad (full fine-tuning; ``--frozen-head`` for
LoRA), one after the other in this process; ``measure`` reports the peak RSS above the level before
each call (on CUDA, the peak allocated memory instead). Reference log-probs are precomputed, as the
trainer does, outside the measured calls.

    .venv/bin/python -P benchmarks/bench_preference_losses.py                    # 4x512 and 8x1024
    .venv/bin/python -P benchmarks/bench_preference_losses.py --shapes 4x512     # the small one only

Shapes are ``pairs x tokens`` at SmolLM2-135M's head (H=576, V=49,152): ``2 x pairs`` sequences (KTO:
completions + mismatched KL rows). ``--prompt-tokens`` masks that many leading positions per
sequence (the fused path computes no logits for them); the default 0 scores every position, the
fused path's least favourable case. The naive 8x1024 float32 run holds several 3 GiB logits-sized
tensors at once (~13 GiB).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measurement, measure, ratio  # noqa: E402

from tunegraph.kernels.fused_linear_preference import (  # noqa: E402
    fused_linear_preference_loss,
    fused_linear_sequence_logps,
)
from tunegraph.training.objectives import get_objective, sequence_logps, token_mean_nll  # noqa: E402

HIDDEN, VOCAB = 576, 49_152  # SmolLM2-135M's LM head
OBJECTIVES = ["dpo", "orpo", "simpo", "kto"]
SHAPES = ["4x512", "8x1024"]


def make_inputs(pairs: int, tokens: int, prompt_tokens: int, dtype: torch.dtype, device: str, frozen_head: bool):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, tokens, HIDDEN, generator=generator).to(device, dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02).to(device, dtype)
    labels = torch.randint(0, VOCAB, (2 * pairs, tokens), generator=generator)
    labels[:, :prompt_tokens] = -100
    return hidden.requires_grad_(), weight.requires_grad_(not frozen_head), labels.to(device)


def reference_for(hidden, weight, labels, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs near the policy's (the loss is neither saturated nor zero)."""
    logps, _ = fused_linear_sequence_logps(hidden, weight, labels, average, chunk_size=2)
    n = logps.shape[0] // 2
    shift = torch.linspace(-1.0, 1.0, 2 * n, device=logps.device)
    return logps[:n] + shift[:n], logps[n:] + shift[n:] - 1.0


def naive(name: str, hidden, weight, labels, reference, desirable):
    """The trainer's path: logits of every position, sequence_logps, the objective."""
    objective = get_objective(name)
    n = hidden.shape[0] // 2
    logps, n_tokens = sequence_logps(F.linear(hidden, weight), labels, objective.average_logps)
    first, second = logps[:n], logps[n:]
    if objective.batch == "unpaired":
        return objective.fn(first, reference[0], desirable, second, reference[1]).loss
    args = [first, second] + (list(reference) if objective.needs_reference else [])
    if objective.needs_chosen_nll:
        sums = first * n_tokens[:n] if objective.average_logps else first
        args.append(token_mean_nll(sums, n_tokens[:n]))
    return objective.fn(*args).loss


def fused(name: str, hidden, weight, labels, reference, desirable, chunk_size: int):
    return fused_linear_preference_loss(name, hidden, weight, labels, reference=reference, desirable=desirable,
                                        chunk_size=chunk_size).loss


def fwd_bwd(loss_fn, leaves) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step's worth of loss work: forward and backward, gradients returned (not kept on leaves)."""
    loss = loss_fn()
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def run_measured(fn, device: str, repeats: int) -> Measurement:
    if device != "cuda":
        return measure(fn, repeats)
    best, peak, result = float("inf"), 0, None
    for _ in range(repeats):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return Measurement(best, peak, result)


def bench(name: str, pairs: int, tokens: int, args) -> dict:
    hidden, weight, labels = make_inputs(pairs, tokens, args.prompt_tokens, getattr(torch, args.dtype), args.device,
                                         args.frozen_head)
    objective = get_objective(name)
    reference = reference_for(hidden, weight, labels, objective.average_logps) if objective.needs_reference else None
    desirable = (torch.arange(pairs, device=args.device) % 2 == 0) if objective.batch == "unpaired" else None
    leaves = [t for t in (hidden, weight) if t.requires_grad]
    fused_run = run_measured(
        lambda: fwd_bwd(lambda: fused(name, hidden, weight, labels, reference, desirable, args.chunk_size), leaves),
        args.device, args.repeats)
    base_run = run_measured(lambda: fwd_bwd(lambda: naive(name, hidden, weight, labels, reference, desirable), leaves),
                            args.device, args.repeats)
    (fused_loss, fused_grads), (base_loss, base_grads) = fused_run.result, base_run.result
    grad_diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
                    for a, b in zip(fused_grads, base_grads))
    return {"name": name, "shape": f"{pairs}x{tokens}", "base": base_run, "fused": fused_run,
            "loss_diff": abs(float(fused_loss) - float(base_loss)), "grad_diff": grad_diff}


def print_row(row: dict) -> None:
    base, fused_run = row["base"], row["fused"]
    print(f"{row['name']:6} {row['shape']:>7}"
          f" | {base.peak_extra_mib:9.0f} {fused_run.peak_extra_mib:9.0f} "
          f"{ratio(fused_run.peak_extra_bytes, base.peak_extra_bytes):>6}"
          f" | {base.seconds:8.2f} {fused_run.seconds:8.2f} {ratio(fused_run.seconds, base.seconds):>6}"
          f" | {row['loss_diff']:.1e} {row['grad_diff']:.1e}", flush=True)


def parse_shape(text: str) -> tuple[int, int]:
    pairs, tokens = text.lower().split("x")
    return int(pairs), int(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, help="registered objective names")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="PAIRSxTOKENS, e.g. 4x512")
    parser.add_argument("--chunk-size", type=int, default=1, help="pairs (KTO: completions) per fused chunk")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="leading positions per sequence not scored")
    parser.add_argument("--frozen-head", action="store_true", help="LM-head weight without grad (LoRA)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="hidden/head dtype")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side: fastest time, largest peak")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {device_name}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, chunk {args.chunk_size}, "
          f"prompt tokens {args.prompt_tokens}, head {'frozen' if args.frozen_head else 'trained'}")
    # warm-up: one-off library initialisation must not land in the first measured call
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    bench("dpo", 1, 16, warm)
    print(f"{'loss':6} {'shape':>7} | {'naive MiB':>9} {'fused MiB':>9} {'ratio':>6}"
          f" | {'naive s':>8} {'fused s':>8} {'ratio':>6} | loss diff, grad rel diff")
    for shape in args.shapes:
        pairs, tokens = parse_shape(shape)
        for name in args.objectives:
            print_row(bench(name, pairs, tokens, args))


if __name__ == "__main__":
    main()
