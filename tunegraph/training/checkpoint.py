"""Training checkpoints: every N optimizer steps, keep the last K, resume bit-identically.

A checkpoint is a directory ``step-<N>`` (N = optimizer steps done) holding

- ``trainable.safetensors``: the parameters with ``requires_grad`` (the LoRA adapter, or the whole
  model for ``full``); frozen parameters come back from the base model the stage loads anyway;
- ``state.pt``: optimizer and LR-scheduler state, python/numpy/torch(/CUDA) RNG states and the
  loop's own bookkeeping (per-step losses and metrics, token count), so the resumed run reports
  the same summary as an uninterrupted one; the micro-batch schedule is derived from the seed and
  needs no state;
- ``checkpoint.json``: format, step and the run's fingerprint. A checkpoint whose fingerprint
  differs (another configuration, another torch, other trainable parameters) is never resumed.

It is written into a temp directory beside its final place, fsynced and renamed into place, so a
kill at any instant leaves either a complete checkpoint or none; temp directories left by a killed
run are ignored and removed by the next save. Older checkpoints are deleted only after a new one is
complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunegraph.hashing import hash_json

FORMAT = 1
META_NAME = "checkpoint.json"
WEIGHTS_NAME = "trainable.safetensors"
STATE_NAME = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
# LoopSettings fields that only say how often to checkpoint: they do not change the trained model.
_NOT_FINGERPRINTED = ("checkpoint_every", "keep_checkpoints")


@dataclass
class LoopState:
    """What the training loop has accumulated after ``step`` optimizer steps."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    history: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad``, by name, detached, on the CPU."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def run_fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings, n_examples: int,
                    seed: int, threads: int, extra: str = "") -> str:
    """What must be equal for a checkpoint to continue this run exactly.

    The stage's own fingerprint (params, data, code) already names the checkpoint directory;
    this guards the directory against a loop run with other settings or other trainable
    parameters (and against a torch upgrade, which may change the numerics)."""
    loop = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_FINGERPRINTED}
    trainable = [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters() if p.requires_grad]
    return hash_json({"format": FORMAT, "loop": loop, "n_examples": n_examples, "seed": seed, "threads": threads,
                      "trainable": trainable, "optimizer": type(optimizer).__qualname__,
                      "param_groups": [len(g["params"]) for g in optimizer.param_groups],
                      "torch": torch.__version__, "extra": extra})


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def list_checkpoints(directory: Path, fingerprint: str) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of this run in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        meta = _read_meta(path)
        step = int(match.group(1))
        if (meta and meta.get("format") == FORMAT and meta.get("fingerprint") == fingerprint
                and meta.get("step") == step and (path / WEIGHTS_NAME).is_file() and (path / STATE_NAME).is_file()):
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(directory: Path, fingerprint: str) -> Path | None:
    checkpoints = list_checkpoints(directory, fingerprint)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(directory: Path, fingerprint: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: LoopState, keep: int) -> Path:
    """Write ``directory/step-<state.step>`` atomically, then keep only the newest ``keep`` of this run."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be at least 1, not {keep}")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{state.step:08d}-", dir=directory))
    try:
        save_file(trainable_state(model), tmp / WEIGHTS_NAME)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                    "loop": dataclasses.asdict(state)}, tmp / STATE_NAME)
        (tmp / META_NAME).write_text(json.dumps({"format": FORMAT, "step": state.step, "fingerprint": fingerprint},
                                                indent=2) + "\n", encoding="utf-8")
        for name in (WEIGHTS_NAME, STATE_NAME, META_NAME):
            _fsync(tmp / name)
        final = directory / f"step-{state.step:08d}"
        if final.exists():  # another configuration's checkpoint of the same step (ours would have been resumed)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory)
    for _, old in list_checkpoints(directory, fingerprint)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(f"{_TMP_PREFIX}*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> LoopState:
    """Restore trainable parameters, optimizer, scheduler and RNG states; return the loop's state."""
    weights = load_file(path / WEIGHTS_NAME)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise ValueError(f"checkpoint {path} holds other trainable parameters than the model")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(weights[name])
    saved = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return LoopState(**saved["loop"])


class Checkpointer:
    """The loop's view: resume from the newest checkpoint of this run, save every ``every`` steps."""

    def __init__(self, directory: Path, every: int, keep: int, fingerprint: str):
        self.directory, self.every, self.keep, self.fingerprint = Path(directory), every, keep, fingerprint

    def resume(self, model, optimizer, scheduler) -> LoopState | None:
        latest = latest_checkpoint(self.directory, self.fingerprint)
        return load_checkpoint(latest, model, optimizer, scheduler) if latest is not None else None

    def after_step(self, model, optimizer, scheduler, state: LoopState) -> Path | None:
        if state.step % self.every:
            return None
        return save_checkpoint(self.directory, self.fingerprint, model, optimizer, scheduler, state, self.keep)
