"""Peak memory and wall time of one call, measured side by side in the same process.

Linux keeps a process's peak resident set size in ``/proc/self/status`` (``VmHWM``); writing ``5`` to
``/proc/self/clear_refs`` resets that peak to the current RSS. So each measured call starts from a
fresh peak and reports ``peak - rss_before``: the extra memory the call needed at its worst moment,
comparable between a baseline and a candidate run one after the other in one script.
Large torch CPU tensors are mmap-backed and returned to the OS when freed, so one call's memory
does not leak into the next call's figure.
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

_STATUS = "/proc/self/status"


def _return_freed_memory_to_the_os() -> None:
    """Pin glibc's mmap threshold at 128 KiB. glibc raises it after the first large frees, after which
    freed tensors stay resident in the heap and a later call's peak would read as zero."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_return_freed_memory_to_the_os()


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_extra_bytes: int   # peak RSS during the call minus RSS just before it
    result: Any = None

    @property
    def peak_extra_mib(self) -> float:
        return self.peak_extra_bytes / 2**20


def _status_kib(field: str) -> int:
    with open(_STATUS) as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.M).group(1))


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure(fn: Callable[[], Any], repeats: int = 1) -> Measurement:
    """Run ``fn`` ``repeats`` times; report the fastest wall time and the largest peak extra RSS."""
    best_seconds, worst_peak, result = float("inf"), 0, None
    for _ in range(repeats):
        gc.collect()
        before = _status_kib("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        best_seconds = min(best_seconds, seconds)
        worst_peak = max(worst_peak, (peak - before) * 1024)
    return Measurement(best_seconds, worst_peak, result)


def ratio(candidate: float, baseline: float) -> str:
    """``candidate / baseline`` formatted for a table, e.g. ``0.38x``."""
    return f"{candidate / baseline:.2f}x" if baseline else "n/a"
