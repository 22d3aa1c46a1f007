"""RMSNorm, RoPE, SwiGLU and GeGLU: tunegraph's ops vs the plain-torch references, fwd+bwd time and peak memory.

Shapes are SmolLM2-135M's at 4096 tokens (batch 4 x 1024): hidden 576, intermediate 1536, 9 query heads
and 3 key/value heads of 64. The references are transformers' own arithmetic (``LlamaRMSNorm``,
``Gemma3RMSNorm``, ``apply_rotary_pos_emb``, ``act_fn(gate) * up``). Each side runs forward and backward
on the same inputs, one after the other in this process; ``measure`` reports the peak RSS above the level
before the call (on CUDA, the peak allocated memory instead). On CPU tensors tunegraph's ops take their
torch path; on CUDA tensors their Triton kernels (see ``tunegraph.kernels.dispatch``).

    .venv/bin/python -P benchmarks/bench_elementwise_kernels.py                 # fp32 and bf16, 5 repeats
    .venv/bin/python -P benchmarks/bench_elementwise_kernels.py --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measurement, measure, ratio  # noqa: E402

from tunegraph.kernels.geglu import gelu_tanh_mul, gelu_tanh_mul_reference  # noqa: E402
from tunegraph.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from tunegraph.kernels.rope import rotary_pos_emb, rotary_pos_emb_reference  # noqa: E402
from tunegraph.kernels.swiglu import silu_mul, silu_mul_reference  # noqa: E402

def _return_freed_memory_to_the_os() -> None:
    """Fix glibc's mmap threshold at 128 KiB, so that every tensor of this size is mmap-backed.

    By default glibc raises the threshold to the size of the largest mmap-backed block freed so far (up to
    32 MiB); after the first few frees, tensors of these sizes come from the heap and their memory stays
    resident when freed, so the next call's peak RSS would not rise at all. Setting it disables that.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: peaks may read low
        print("warning: could not fix the malloc mmap threshold; peak memory figures may read low")


BATCH, SEQ = 4, 1024                     # 4096 tokens
HIDDEN, INTERMEDIATE = 576, 1536         # SmolLM2-135M
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
EPS = 1e-5


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    fused: Callable            # (*inputs) -> tensor or tuple of tensors
    reference: Callable
    make_inputs: Callable      # (dtype, device, generator) -> (leaves requiring grad, constants)


def _randn(generator, *shape, dtype, device, scale=1.0):
    return (scale * torch.randn(*shape, generator=generator)).to(device, dtype)


def norm_inputs(dtype, device, generator):
    x = _randn(generator, BATCH * SEQ, HIDDEN, dtype=dtype, device=device)
    weight = _randn(generator, HIDDEN, dtype=dtype, device=device, scale=0.1) + 1.0
    return [x.requires_grad_(), weight.requires_grad_()], []


def rope_inputs(dtype, device, generator):
    # q and k as the attention module makes them: (b, s, h, d) memory seen as (b, h, s, d)
    q = _randn(generator, BATCH, SEQ, HEADS, HEAD_DIM, dtype=dtype, device=device).transpose(1, 2)
    k = _randn(generator, BATCH, SEQ, KV_HEADS, HEAD_DIM, dtype=dtype, device=device).transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    angles = torch.arange(SEQ, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[None]
    return [q.requires_grad_(), k.requires_grad_()], [angles.cos().to(device, dtype), angles.sin().to(device, dtype)]


def glu_inputs(dtype, device, generator):
    gate = _randn(generator, BATCH * SEQ, INTERMEDIATE, dtype=dtype, device=device, scale=2.0)
    up = _randn(generator, BATCH * SEQ, INTERMEDIATE, dtype=dtype, device=device)
    return [gate.requires_grad_(), up.requires_grad_()], []


CASES = [
    Case("rms_norm[llama]", f"{BATCH * SEQ}x{HIDDEN}", lambda x, w: rms_norm(x, w, EPS, "llama"),
         lambda x, w: rms_norm_reference(x, w, EPS, "llama"), norm_inputs),
    Case("rms_norm[gemma]", f"{BATCH * SEQ}x{HIDDEN}", lambda x, w: rms_norm(x, w, EPS, "gemma"),
         lambda x, w: rms_norm_reference(x, w, EPS, "gemma"), norm_inputs),
    Case("rope", f"q {BATCH}x{HEADS}x{SEQ}x{HEAD_DIM}, k {KV_HEADS} heads", rotary_pos_emb,
         rotary_pos_emb_reference, rope_inputs),
    Case("swiglu", f"{BATCH * SEQ}x{INTERMEDIATE}", silu_mul, silu_mul_reference, glu_inputs),
    Case("geglu", f"{BATCH * SEQ}x{INTERMEDIATE}", gelu_tanh_mul, gelu_tanh_mul_reference, glu_inputs),
]


def fwd_bwd(op: Callable, leaves: list[torch.Tensor], constants: list[torch.Tensor], upstream: list[torch.Tensor]):
    """One training step's worth of work for the op: forward, then backward with fixed upstream grads."""
    outputs = op(*leaves, *constants)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, upstream)
    return outputs[0].detach()


def measure_once(fn: Callable, device: str) -> Measurement:
    if device != "cuda":
        return measure(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return Measurement(time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, result)


def measure_side(op, leaves, constants, upstream, device: str, repeats: int) -> tuple[Measurement, list]:
    """Fastest time and largest peak over ``repeats`` runs; grads are cleared *between* measured calls,
    so that freeing the previous run's grads never lowers a measured peak."""
    runs = []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        runs.append(measure_once(lambda: fwd_bwd(op, leaves, constants, upstream), device))
    grads = [leaf.grad for leaf in leaves]
    best = Measurement(min(r.seconds for r in runs), max(r.peak_extra_bytes for r in runs), runs[-1].result)
    return best, grads


def bench(case: Case, dtype: torch.dtype, device: str, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    leaves, constants = case.make_inputs(dtype, device, generator)
    with torch.no_grad():
        outputs = case.reference(*leaves, *constants)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [_randn(generator, *o.shape, dtype=o.dtype, device=device) for o in outputs]
    del outputs
    ours, ours_grads = measure_side(case.fused, leaves, constants, upstream, device, repeats)
    base, base_grads = measure_side(case.reference, leaves, constants, upstream, device, repeats)
    # largest difference over the output and the grads, relative to that tensor's largest element
    diff = max((a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
               for a, b in zip(ours_grads + [ours.result], base_grads + [base.result]))
    return {"case": case, "base": base, "ours": ours, "max_diff": diff}


def print_row(row: dict, dtype: str) -> None:
    case, base, ours = row["case"], row["base"], row["ours"]
    print(
        f"{case.name:16} {dtype:8} {case.shape:28}"
        f" | {base.seconds * 1e3:8.1f} {ours.seconds * 1e3:8.1f} {ratio(ours.seconds, base.seconds):>6}"
        f" | {base.peak_extra_mib:8.1f} {ours.peak_extra_mib:8.1f}"
        f" {ratio(ours.peak_extra_bytes, base.peak_extra_bytes):>6}"
        f" | {row['max_diff']:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32", "bfloat16"],
                        help="activation dtypes to run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side: fastest time, largest peak")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (1 gives steadier times on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _return_freed_memory_to_the_os()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    backend = os.environ.get("TUNEGRAPH_KERNEL_BACKEND", "auto")
    print(f"machine: {device_name}, {os.cpu_count()} CPUs, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, backend {backend}, best of {args.repeats}")
    for case in CASES:  # warm-up: one-off initialisation must not land in the first measured call
        bench(case, torch.float32, args.device, 1)
    print(f"{'op':16} {'dtype':8} {'shape':28} | {'ref ms':>8} {'ours ms':>8} {'time':>6}"
          f" | {'ref MiB':>8} {'ours MiB':>8} {'memory':>6} | max rel diff")
    for dtype in args.dtype:
        for case in CASES:
            print_row(bench(case, getattr(torch, dtype), args.device, args.repeats), dtype)


if __name__ == "__main__":
    main()
