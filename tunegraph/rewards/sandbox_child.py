"""The sandbox's child process: confine itself, then run untrusted code and its tests.

Run by :func:`tunegraph.rewards.sandbox.run_python` as ``python -I -S sandbox_child.py REPORT_FD JOB``
in a fresh session, a fresh temporary working directory and a minimal environment, stdin /dev/null. Standard
library only, nothing from tunegraph (``-S`` leaves site-packages out).

The child first runs trusted code, single-threaded, before any untrusted byte executes:

1. reads its job (code, tests, limits, a random nonce) from the file JOB and deletes it;
2. enters a new network namespace where the kernel allows it (root: ``CLONE_NEWNET``; other users:
   ``CLONE_NEWUSER | CLONE_NEWNET``, i.e. unprivileged user namespaces), leaving only a loopback
   device that is down;
3. as root, drops to uid/gid 65534 (nobody), keeping only ``CAP_DAC_READ_SEARCH`` when the Python
   installation is not readable by others (so ``import`` still works), so that
   ``RLIMIT_NPROC`` is enforced: the kernel exempts root from it;
4. sets ``no_new_privs`` (no setuid binaries) and the rlimits: CPU, address space, file size,
   open files, processes (NPROC counts the uid's processes *and threads*), no core dumps;
5. reports what held to the parent on the pipe REPORT_FD and closes it;
6. replaces the socket API, the process-creation API (``os.fork``, ``subprocess``...) and
   ``os.kill``/``os.killpg`` by functions that raise ``PermissionError``. This Python-level block is *not* a security boundary
   (``ctypes`` reaches libc directly); it makes naive code fail the same way on every machine.

Then it runs the solution, then the tests: every top-level ``assert`` of the tests is one test,
other top-level statements are setup (when one fails, the remaining tests fail). The last line
it writes to stdout is ``<nonce> <json outcome>``; the parent counts a run as passed only with that
line, so ``sys.exit(0)`` or ``os._exit(0)`` in the solution does not pass. Code running in this
interpreter could still read the nonce from memory: this guards against accidents, not against a
deliberate forger.
"""

from __future__ import annotations

import ast
import json
import os
import resource
import sys
import traceback

NOBODY = 65534
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# --------------------------------------------------------------------------- confinement


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    """Enter new namespaces; False where the kernel or the platform refuses."""
    try:
        if hasattr(os, "unshare"):  # Python 3.12+
            os.unshare(flags)
            return True
        ctypes, libc = _libc()
        return libc.unshare(ctypes.c_int(flags)) == 0
    except (OSError, AttributeError):
        return False


def _prctl(option: int, arg: int) -> bool:
    try:
        ctypes, libc = _libc()
        return libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _set_capabilities(mask: int) -> bool:
    """Set the effective and permitted capability sets to ``mask`` (inheritable: none)."""
    try:
        ctypes, libc = _libc()
    except OSError:
        return False

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(LINUX_CAPABILITY_VERSION_3, 0)
    data = (Data * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    return libc.capset(ctypes.byref(header), data) == 0


def _permitted_capabilities() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("CapPrm:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return None


def _readable_by_others(path: str) -> bool:
    """Whether uid nobody can list ``path`` (every ancestor searchable, the folder readable)."""
    path = os.path.realpath(path)
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        while path != os.path.dirname(path):
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def _drop_root() -> str:
    """Become uid/gid nobody. Returns how, or raises OSError (the caller stays root)."""
    stdlib = os.path.dirname(os.__file__)
    need_read = not _readable_by_others(stdlib)
    if need_read and not _prctl(PR_SET_KEEPCAPS, 1):
        raise OSError("prctl(PR_SET_KEEPCAPS) failed")
    os.chown(".", NOBODY, NOBODY)  # the working directory must stay writable
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    if need_read:
        # setresuid kept the permitted set: shrink it to read-only file access, for the stdlib
        wanted = 1 << CAP_DAC_READ_SEARCH
        if not _set_capabilities(wanted) or _permitted_capabilities() != wanted:
            os._exit(97)  # half-dropped: never run untrusted code like this
        _prctl(PR_SET_KEEPCAPS, 0)
        return "nobody+CAP_DAC_READ_SEARCH"
    if _permitted_capabilities() not in (0, None):
        os._exit(97)
    return "nobody"


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real uid is ``uid`` (what RLIMIT_NPROC counts)."""
    total = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        try:
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
        except (KeyError, ValueError, IndexError):
            continue
    return total


def _limit(kind: int, soft: int, hard: int | None = None) -> None:
    """Lower a resource limit (never raise it: a lower hard limit already set is kept)."""
    hard = soft if hard is None else hard
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))


def confine(job: dict) -> dict:
    """Namespaces, identity, rlimits. Returns what holds, for the parent's report."""
    report = {"network": "python-block", "user": str(os.getuid()), "processes": "python-guard"}
    root = os.geteuid() == 0
    fresh_count = False
    if root and _unshare(CLONE_NEWNET):
        report["network"] = "namespace"
    elif not root and _unshare(CLONE_NEWUSER | CLONE_NEWNET):
        report["network"] = "namespace"
        fresh_count = True  # NPROC counts per (user namespace, uid): starts at this process
        _set_capabilities(0)  # the capabilities a new user namespace hands out: not needed
    if report["network"] == "namespace":
        report["netns"] = os.stat("/proc/self/ns/net").st_ino
    if root:
        try:
            report["user"] = _drop_root()
        except OSError as error:
            report["user"] = f"root ({error.strerror or error})"
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    enforced = os.getuid() != 0
    if enforced:
        report["processes"] = "rlimit"
    baseline = 1 if fresh_count else _tasks_of(os.getuid())
    mb = 1024 * 1024
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, job["cpu_s"], job["cpu_s"] + 1)  # SIGXCPU, then SIGKILL a second later
    _limit(resource.RLIMIT_FSIZE, job["file_mb"] * mb)
    _limit(resource.RLIMIT_NOFILE, 256)
    _limit(resource.RLIMIT_NPROC, baseline + job["max_processes"])
    _limit(resource.RLIMIT_AS, job["memory_mb"] * mb)
    return report


# --------------------------------------------------------------------------- Python-level guards


def _blocked(what: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the sandbox")

    return refuse


def install_guards() -> None:
    """Replace the socket, process and signal APIs by functions that raise PermissionError."""
    import _socket
    import socket

    message = "network access is disabled in the sandbox"

    class BlockedSocket(socket.socket):  # a class, so that ssl, asyncio... still import
        def __init__(self, *args, **kwargs):
            raise PermissionError(message)

    network = _blocked("network access")
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
            if hasattr(module, name):
                setattr(module, name, network)
        module.socket = module.SocketType = BlockedSocket
    processes = _blocked("starting processes")
    import _posixsubprocess
    import posix

    for module in (os, posix):
        for name in dir(module):
            if name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp") \
                    or name.startswith(("exec", "spawn")):
                setattr(module, name, processes)
            elif name in ("kill", "killpg"):
                setattr(module, name, _blocked("signalling other processes"))
    _posixsubprocess.fork_exec = processes


# --------------------------------------------------------------------------- running the code


def _split_tests(tests: str) -> list[tuple[bool, ast.Module]]:
    """Top-level statements as (is_test, module); no top-level assert: the whole text is one test."""
    tree = ast.parse(tests, "<tests>")
    if not any(isinstance(node, ast.Assert) for node in tree.body):
        return [(True, tree)]
    return [(isinstance(node, ast.Assert), ast.Module([node], [])) for node in tree.body]


def count_tests(tests: str) -> int:
    """How many tests ``tests`` holds (0 when it does not parse)."""
    try:
        return sum(is_test for is_test, _ in _split_tests(tests))
    except (SyntaxError, ValueError):
        return 0


def run_untrusted(code: str, tests: str) -> dict:
    """Run the solution then the tests in one namespace; count the tests that pass."""
    outcome = {"passed": 0, "total": 0, "error": None}
    try:
        parts = _split_tests(tests)
    except (SyntaxError, ValueError) as error:
        outcome["error"] = f"<tests>: {type(error).__name__}: {error}"
        return outcome
    outcome["total"] = sum(is_test for is_test, _ in parts)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}

    def attempt(source, filename: str) -> bool:
        try:
            exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the point of a sandbox
            return True
        except BaseException as error:  # SystemExit, KeyboardInterrupt, MemoryError: a failure like any other
            if outcome["error"] is None:
                outcome["error"] = f"{filename}: {type(error).__name__}"
            try:  # the traceback without this file's frame
                traceback.print_exception(type(error), error, error.__traceback__.tb_next)
            except BaseException:
                pass
            return False

    if not attempt(code, "<solution>"):
        return outcome
    for is_test, part in parts:
        ok = attempt(part, "<tests>")
        if is_test:
            outcome["passed"] += ok
        elif not ok:
            break  # setup failed: the remaining tests fail
    return outcome


def main() -> None:
    write, exit_now, dumps = os.write, os._exit, json.dumps  # kept before untrusted code runs
    report_fd, job_file = int(sys.argv[1]), sys.argv[2]
    with open(job_file, "rb") as handle:
        job = json.loads(handle.read())
    os.unlink(job_file)  # gone before untrusted code runs: it holds the nonce
    report = confine(job)
    write(report_fd, dumps(report).encode())
    os.close(report_fd)
    nonce = job.pop("nonce")
    install_guards()
    outcome = run_untrusted(job["code"], job["tests"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        write(1, f"\n{nonce} {dumps(outcome)}\n".encode())
    except OSError:
        exit_now(3)
    exit_now(0)


if __name__ == "__main__":
    main()
