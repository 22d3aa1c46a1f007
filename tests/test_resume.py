"""Checkpoints every N steps, keep the last K, and resume bit-identically after a kill.

The SFT test kills a real stage process with SIGKILL (no cleanup runs) after it wrote a checkpoint,
resumes it in this process, and compares the saved model bytes with an uninterrupted run. This file
is also that child process's script (see ``__main__`` at the bottom).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tunegraph.context import StageContext, seed_everything
from tunegraph.tasks.sft import SFTParams, sft
from tunegraph.training.checkpoint import META_NAME, WEIGHTS_NAME
from tunegraph.training.loop import LoopSettings, StepOutput, train


class _Stop(BaseException):
    """Stands in for a kill inside this process (BaseException, like KeyboardInterrupt)."""


def _stop_at(stop_step: int | None, action=None):
    def logger(step: int, metrics: dict[str, float]) -> None:
        if step == stop_step:
            (action or _raise_stop)()
    return logger


def _raise_stop():
    raise _Stop


def _ctx(workspace: Path, checkpoint_dir: Path | None, step_logger=None) -> StageContext:
    seed_everything(5, 2)  # as the runner does at the start of every (re)run
    return StageContext(stage="t", seed=5, threads=2, workspace=workspace, step_logger=step_logger,
                        checkpoint_dir=checkpoint_dir)


# A toy model, so the loop's own checkpoint logic is tested in milliseconds: dropout draws from
# torch's RNG, the step draws from python's and numpy's, one layer is frozen.
X = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
Y = X.sum(dim=1, keepdim=True)
SETTINGS = LoopSettings(epochs=3, batch_size=4, grad_accum=2, learning_rate=1e-2, warmup_ratio=0.2,
                        weight_decay=0.01, max_grad_norm=1.0, max_steps=None, checkpoint_every=2, keep_checkpoints=2)
TOY_STEPS = 5  # 3 epochs x 3 micro batches / grad_accum 2, rounded up


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.hidden = torch.nn.Linear(4, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.hidden(self.frozen(x)))))


def _toy_step(model, indices: list[int]) -> StepOutput:
    noise = 1 + 0.01 * random.random() + 0.01 * float(np.random.rand())
    loss = ((model(X[indices]) - Y[indices]) ** 2).mean() * noise
    return StepOutput(loss, len(indices), {"noise": noise})


def _train_toy(tmp_path: Path, checkpoint_dir: Path | None, settings: LoopSettings = SETTINGS, stop: int | None = None):
    ctx = _ctx(tmp_path, checkpoint_dir, _stop_at(stop))
    model = Toy()
    summary = train(model, len(X), _toy_step, settings, ctx)
    return model.state_dict(), dataclasses.replace(summary, seconds=0.0)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps_saved(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_toy_resume_is_bit_identical(tmp_path, capsys):
    plain = _train_toy(tmp_path, None, dataclasses.replace(SETTINGS, checkpoint_every=None))
    full = _train_toy(tmp_path, tmp_path / "full")
    assert _same_weights(plain[0], full[0]) and plain[1] == full[1]  # saving checkpoints perturbs nothing

    ck = tmp_path / "ck"
    try:
        _train_toy(tmp_path, ck, stop=3)  # killed during the 4th step's logging: checkpoints at 2 (and none at 4)
    except _Stop:
        pass
    assert _steps_saved(ck) == ["step-00000002"]
    # A kill while writing checkpoint 4 leaves a temp dir; a damaged checkpoint has no readable meta.
    (ck / ".tmp-step-00000004-x").mkdir()
    (ck / ".tmp-step-00000004-x" / WEIGHTS_NAME).write_bytes(b"half")
    (ck / "step-00000003").mkdir()
    (ck / "step-00000003" / META_NAME).write_text("{not json")
    capsys.readouterr()

    resumed = _train_toy(tmp_path, ck)
    assert "resuming from step 2" in capsys.readouterr().err
    assert _same_weights(full[0], resumed[0])
    assert full[1] == resumed[1]  # losses, metrics and token counts of steps before the kill are restored too
    assert not any(p.name.startswith(".tmp-") for p in ck.iterdir())


def test_keeps_the_last_k_checkpoints(tmp_path):
    _train_toy(tmp_path, tmp_path / "two")
    assert _steps_saved(tmp_path / "two") == ["step-00000002", "step-00000004"]
    _train_toy(tmp_path, tmp_path / "one", dataclasses.replace(SETTINGS, checkpoint_every=1, keep_checkpoints=1))
    assert _steps_saved(tmp_path / "one") == [f"step-{TOY_STEPS:08d}"]
    _train_toy(tmp_path, tmp_path / "all", dataclasses.replace(SETTINGS, checkpoint_every=1, keep_checkpoints=9))
    assert _steps_saved(tmp_path / "all") == [f"step-{n:08d}" for n in range(1, TOY_STEPS + 1)]


def test_checkpoint_of_another_configuration_is_never_resumed(tmp_path, capsys):
    ck = tmp_path / "ck"
    try:
        _train_toy(tmp_path, ck, stop=3)
    except _Stop:
        pass
    assert _steps_saved(ck) == ["step-00000002"]
    other = dataclasses.replace(SETTINGS, learning_rate=2e-2)
    capsys.readouterr()
    resumed = _train_toy(tmp_path, ck, other)
    assert "resuming" not in capsys.readouterr().err
    fresh = _train_toy(tmp_path, tmp_path / "fresh", other)
    assert _same_weights(fresh[0], resumed[0]) and fresh[1] == resumed[1]

    # How often to checkpoint is not part of the configuration: changing it still resumes.
    try:
        _train_toy(tmp_path, tmp_path / "ck2", stop=3)
    except _Stop:
        pass
    capsys.readouterr()
    _train_toy(tmp_path, tmp_path / "ck2", dataclasses.replace(SETTINGS, checkpoint_every=3, keep_checkpoints=5))
    assert "resuming from step 2" in capsys.readouterr().err


# --- the real sft stage on the tiny model, killed with SIGKILL --------------------------------------------

class CheckpointedSFT(SFTParams):
    """SFT params whose loop checkpoints every 2 steps (until TrainingParams carries checkpoint_every)."""

    def loop_settings(self) -> LoopSettings:
        return dataclasses.replace(super().loop_settings(), checkpoint_every=2, keep_checkpoints=2)


SFT_PARAMS = dict(strategy="lora", epochs=2, max_steps=6, batch_size=4, learning_rate=5e-3, max_length=128)


def run_sft(artifacts: Path, out: Path, checkpoint_dir: Path, kill_at: int | None = None):
    out.mkdir(parents=True, exist_ok=True)
    kill = _stop_at(kill_at, lambda: os.kill(os.getpid(), signal.SIGKILL))
    return sft(CheckpointedSFT(**SFT_PARAMS), {"model": artifacts / "model", "dataset": artifacts / "train"}, out,
               _ctx(out, checkpoint_dir, kill))


def test_sft_killed_and_resumed_is_bit_identical(tiny_artifacts, tmp_path, capfd):
    full = run_sft(tiny_artifacts, tmp_path / "full", tmp_path / "ck_full")
    assert full.metrics["steps"] == 6

    ck = tmp_path / "ck"
    child = subprocess.run([sys.executable, "-P", __file__, str(tiny_artifacts), str(tmp_path / "killed"), str(ck), "2"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert _steps_saved(ck) == ["step-00000002"]  # killed after step 3, before any step-4 checkpoint
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    capfd.readouterr()
    resumed = run_sft(tiny_artifacts, tmp_path / "resumed", ck)
    assert "resuming from step 2" in capfd.readouterr().err
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert full.metrics == resumed.metrics
    assert _steps_saved(ck) == ["step-00000004", "step-00000006"]


if __name__ == "__main__":  # the child process of the SFT test
    artifacts, out, checkpoint_dir, kill_at = sys.argv[1:]
    run_sft(Path(artifacts), Path(out), Path(checkpoint_dir), int(kill_at))
    sys.exit("not killed")
