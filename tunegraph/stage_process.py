"""Run one stage in a child process through the same entry point DVC calls.

Each stage gets its own process: torch's global RNG and thread settings cannot leak between
stages that run concurrently, memory is returned when the stage ends, and ``tunegraph run``
and ``dvc repro`` execute literally the same command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tunegraph.errors import StageError

_ERROR_PREFIX = "error: "


def launcher_prefix(processes: int) -> list[str]:
    """How to start the stage: one python process, or ``processes`` data-parallel ranks via torchrun."""
    # -P: do not put the working directory on sys.path (the repo root holds folders named
    # `kernels` and `tasks` that must only be importable as tunegraph.kernels / tunegraph.tasks).
    if processes == 1:
        return [sys.executable, "-P", "-m", "tunegraph.cli"]
    # torchrun runs the `tunegraph` console script beside this interpreter (--no-python), which
    # does not put the working directory on sys.path either; --standalone picks a free port.
    entry_point = str(Path(sys.executable).parent / "tunegraph")
    return [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "--no-python", entry_point]


def stage_command(recipe_path: Path, workspace: Path, name: str, *, force: bool, parent_run_id: str | None,
                  runner: str, processes: int = 1) -> list[str]:
    command = [*launcher_prefix(processes), "stage", str(recipe_path), name,
               "--workspace", str(workspace), "--runner", runner]
    if force:
        command.append("--force")
    if parent_run_id:
        command += ["--parent-run-id", parent_run_id]
    return command


class StageProcessFailed(RuntimeError):
    """The child crashed (not a user error): retryable."""


def run_stage_process(command: list[str], name: str, env: dict[str, str] | None = None) -> None:
    """Run ``command`` (in ``env``, else this process's environment), echoing its output; a user error
    (exit 2) becomes :class:`StageError`."""
    errors: list[str] = []
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=env) as child:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith(_ERROR_PREFIX):
                errors.append(line[len(_ERROR_PREFIX):].strip())
            tail = (tail + [line.rstrip()])[-5:]
        code = child.wait()
    if code == 2 and errors:
        raise StageError(errors[-1])
    if code != 0:
        last = " | ".join(tail[-3:]) or "no output"
        raise StageProcessFailed(f"stage {name!r} exited with code {code}: {last}")
