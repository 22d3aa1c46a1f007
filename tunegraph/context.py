"""What a running stage may know about its run: seed, threads, workspace, metric and progress sinks."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

StepLogger = Callable[[int, dict[str, float]], None]


@dataclass
class StageContext:
    stage: str
    seed: int
    threads: int
    workspace: Path
    step_logger: StepLogger | None = None
    # Where training may keep checkpoints to resume from: stable across attempts of the same
    # fingerprint, outside the stage's temp output dir (the runner fills it).
    checkpoint_dir: Path | None = None
    _last_progress: float = field(default=0.0, repr=False)

    def path(self, relative: str) -> Path:
        """A workspace-relative path from params, made absolute."""
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else self.workspace / candidate

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step metrics (loss, lr, tokens/s...): to MLflow when tracked."""
        if self.step_logger is not None:
            self.step_logger(step, {k: float(v) for k, v in metrics.items()})

    def progress(self, done: int, total: int, message: str = "", every_s: float = 2.0) -> None:
        """One progress line on stderr, at most every ``every_s`` seconds and at the end."""
        now = time.monotonic()
        if done < total and now - self._last_progress < every_s:
            return
        self._last_progress = now
        width = 24
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        print(f"[{self.stage}] [{bar}] {done}/{total} {message}", file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        print(f"[{self.stage}] {message}", file=sys.stderr, flush=True)


def seed_everything(seed: int, threads: int) -> None:
    """Seed python, numpy and torch, and fix torch's thread count (bit-identical CPU results need both)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
