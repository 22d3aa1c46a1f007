"""Which implementation of a fused op runs: Triton on CUDA tensors, the chunked torch path elsewhere.

``TUNEGRAPH_KERNEL_BACKEND`` overrides the choice:

- ``auto`` (default): Triton when every tensor is on a CUDA device and triton imports, else torch;
- ``triton``: always Triton. On CPU tensors this only works under ``TRITON_INTERPRET=1`` (set before
  triton kernels are first imported), which is how CI checks the kernels without a GPU;
- ``torch``: always the plain/chunked torch path.
"""

from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "TUNEGRAPH_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when triton imports (Linux wheels); its kernels still need CUDA or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in BACKENDS:
        from tunegraph.errors import TunegraphError

        raise TunegraphError(f"{BACKEND_ENV}={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the op over ``tensors`` should launch its Triton kernel."""
    backend = requested_backend()
    if backend == "torch" or not triton_available():
        return False
    if backend == "triton":
        return all(t.is_cuda for t in tensors) or interpreting()
    return all(t.is_cuda for t in tensors)
