"""Run untrusted Python (a model's completion) against tests in a confined child process.

:func:`run_python` starts ``python -I -S sandbox_child.py`` (isolated mode: no site-packages,
no ``PYTHON*`` variables, no script folder on ``sys.path``) with

- a fresh temporary directory as working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
- an environment of ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` only: nothing inherited, no secrets;
- its own session and process group; on timeout, and after every run, the whole group is
  killed, and where the child got its own network namespace every process left in that namespace
  too (that also catches a grandchild that called ``setsid()``);
- a wall-clock timeout, and in the child (see :mod:`tunegraph.rewards.sandbox_child`): rlimits on
  CPU time, address space (``memory_mb``), file size, open files and processes, a network
  namespace where the kernel allows it, ``no_new_privs``, and as root a drop to uid ``nobody``.

What holds, on Linux (:attr:`SandboxResult.isolation` says which case a run got):

============================  ==================================  ===================================
protection                    normal user                         root
============================  ==================================  ===================================
CPU, memory, file size,       rlimits; the code cannot raise      rlimits; the child drops to uid
open files                    them                                nobody, so it cannot raise them
                                                                  either (if it cannot drop: it can)
processes (fork bombs)        RLIMIT_NPROC (in a user namespace   the kernel exempts root from NPROC,
                              it counts from this process; else   so the child drops to nobody, where
                              from the uid's current count)       it holds; if it cannot drop: only
                                                                  the Python guard, then the group
                                                                  kill at the timeout
network                       user+network namespace where the    network namespace (CAP_SYS_ADMIN);
                              kernel allows unprivileged user     else the Python block only
                              namespaces; else the Python block
files                         the user's rights (no mount         nobody's rights, plus read access
                              namespace): it can read and write   to every file when Python lives in
                              what the user can                   a private folder (/root/.pyenv)
other processes of the uid    reachable: signals and ptrace       nobody: only other sandboxes
                              (subject to yama.ptrace_scope)
============================  ==================================  ===================================

On top, Python-level guards replace the socket API, the process-creation API (``os.fork``,
``subprocess``, ``os.system``, ``os.exec*``...) and ``os.kill`` by functions raising
``PermissionError``: every machine gives naive code the same answer, so rewards do not depend on
the host. They are not a security boundary (``ctypes`` reaches libc directly). Nor is the whole:
there is no filesystem isolation (no mount namespace, no chroot; the code can write to
world-writable places such as ``/tmp``, RLIMIT_FSIZE caps each file, not the total) and no pid
namespace. For hostile code use a container or a VM; this sandbox contains the accidents a model
makes (infinite loops, huge allocations, fork bombs, stray files, network calls, ``sys.exit(0)``).

No ``preexec_fn``: Python documents it as unsafe when the parent has threads (torch, MLflow and
Prefect all start some), so the child applies its limits itself before running untrusted code.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunegraph.rewards.sandbox_child import count_tests

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
TAIL_CHARS = 2000
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one :func:`run_python` call.

    ``passed``: the solution ran and every test passed (at least one test). ``killed_by``: what
    stopped it early: ``"timeout"`` (wall clock), ``"cpu"`` (RLIMIT_CPU), ``"memory"`` (a
    ``MemoryError`` under RLIMIT_AS), ``"file_size"`` (RLIMIT_FSIZE), ``"signal N"``, or None.
    ``tests_passed``/``tests_total`` count top-level ``assert`` statements of the tests (a test
    text without any is one test). ``isolation`` says which protections held for this run
    (keys ``network``, ``user``, ``processes``; see the module docstring).
    """

    passed: bool
    timed_out: bool
    killed_by: str | None
    stdout_tail: str
    stderr_tail: str
    seconds: float
    tests_passed: int = 0
    tests_total: int = 0
    isolation: dict = field(default_factory=dict)


def _tail(handle, limit: int = TAIL_CHARS * 4) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - limit))
    return handle.read().decode("utf-8", errors="replace")


def _stat_fields(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a pid, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return (fields[0], int(fields[2])) if len(fields) > 2 else None


def _pids() -> list[str]:
    try:
        return [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _alive(pid: str) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and fields[1] == pgid and fields[0] not in ("Z", "X"):
            return True
    return not os.path.isdir("/proc/self")  # without /proc: assume alive, kill until ESRCH


def kill_group(pgid: int, deadline_s: float = 2.0) -> None:
    """SIGKILL a process group until no live member is left (zombies aside) or the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not _group_alive(pgid) or time.monotonic() > end:
            return
        time.sleep(0.005)


def _kill_namespace(netns: int, deadline_s: float = 2.0) -> None:
    """SIGKILL every process in the network namespace ``netns`` (the sandbox's own one)."""
    if not netns or netns == os.stat("/proc/self/ns/net").st_ino:
        return  # never our own namespace
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = False
        for pid in _pids():
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino != netns or not _alive(pid):
                    continue
                os.kill(int(pid), signal.SIGKILL)
                found = True
            except OSError:
                continue
        if not found:
            return
        time.sleep(0.005)


def _remove_tree(path: str) -> None:
    """Delete the work folder even where the code made parts of it unreadable."""
    def make_writable_and_retry(function, target, _excinfo):
        try:
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
            function(target)
        except OSError:
            pass

    for _ in range(3):
        shutil.rmtree(path, onerror=make_writable_and_retry)
        if not os.path.exists(path):
            return


def _read_report(fd: int, deadline: float) -> dict:
    """The child's confinement report: one JSON object, then EOF (before untrusted code runs)."""
    chunks = []
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until the child exits, *without reaping it*: while the group leader is an unreaped
    zombie its pid cannot be reused, so killing its process group afterwards is safe."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(pidfd, selectors.EVENT_READ)
                return bool(selector.select(max(0.0, timeout_s)))
        finally:
            os.close(pidfd)
    end = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= end:
            return False
        time.sleep(0.005)
    return True


def _killed_by(returncode: int, timed_out: bool, outcome: dict | None, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if returncode < 0:
        number = -returncode
        if number == signal.SIGXCPU:
            return "cpu"
        if number == signal.SIGXFSZ:
            return "file_size"
        try:
            return f"signal {signal.Signals(number).name}"
        except ValueError:
            return f"signal {number}"
    error = (outcome or {}).get("error") or ""
    if error.endswith("MemoryError") or (outcome is None and "MemoryError" in stderr):
        return "memory"
    if "File too large" in stderr:
        return "file_size"
    return None


def run_python(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, *,
               max_processes: int = 16, file_mb: int = 16) -> SandboxResult:
    """Run ``code`` then ``tests`` (Python, usually asserts) in a confined child process.

    ``timeout_s``: wall clock for the whole run, interpreter start included. ``memory_mb``: the
    address-space limit. ``max_processes``: processes *and threads* the code may add
    (RLIMIT_NPROC). ``file_mb``: the largest file it may write. Never raises for anything the
    code does; raises ``OSError`` only if no process can be started at all.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    nonce = secrets.token_hex(16)
    job = {"code": code, "tests": tests, "nonce": nonce, "memory_mb": int(memory_mb),
           "cpu_s": max(1, math.ceil(timeout_s)) + 1, "file_mb": int(file_mb), "max_processes": int(max_processes)}
    workdir = tempfile.mkdtemp(prefix="tunegraph-sandbox-")
    env = {"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    job_file = os.path.join(workdir, ".job.json")
    fd = os.open(job_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(job, handle)
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                command = [sys.executable or "python3", "-I", "-S", str(CHILD_SCRIPT), str(write_fd), job_file]
                proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(write_fd,), start_new_session=True)
            finally:
                os.close(write_fd)
            report = _read_report(read_fd, deadline)
            timed_out = not _wait_exit(proc.pid, deadline - time.monotonic())
            kill_group(proc.pid)  # the leader is not reaped yet: its group id is still ours
            proc.wait()
            _kill_namespace(report.get("netns", 0))
            seconds = time.monotonic() - start
            stdout, stderr = _tail(out), _tail(err)
    finally:
        os.close(read_fd)
        if proc is not None and proc.poll() is None:
            kill_group(proc.pid)
            proc.wait()
        _remove_tree(workdir)
    outcome = None
    marker = stdout.rfind(nonce + " ")
    if marker >= 0 and proc.returncode == 0 and not timed_out:
        try:
            outcome = json.loads(stdout[marker + len(nonce) + 1:].splitlines()[0])
        except (ValueError, IndexError):
            outcome = None
        stdout = stdout[:marker].removesuffix("\n")
    passed_count = int(outcome["passed"]) if outcome else 0
    total = count_tests(tests)
    return SandboxResult(passed=bool(outcome) and total > 0 and passed_count == total and not outcome.get("error"),
                         timed_out=timed_out, killed_by=_killed_by(proc.returncode, timed_out, outcome, stderr),
                         stdout_tail=stdout[-TAIL_CHARS:], stderr_tail=stderr[-TAIL_CHARS:], seconds=seconds,
                         tests_passed=passed_count, tests_total=total,
                         isolation={k: v for k, v in report.items() if k != "netns"})
