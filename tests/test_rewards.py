"""Verifiable rewards: the built-ins, resolving specs (built-in and user functions), the sandbox."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import textwrap
import time

import pytest

from tunegraph.errors import DataError, StageError
from tunegraph.rewards import builtin_rewards, reference_answer, resolve_reward
from tunegraph.rewards.builtin import extract_code, extract_number
from tunegraph.rewards.sandbox import run_python


def row(answer: str | None = None, reference: str = "42", **extra) -> dict:
    """A prompt row whose last assistant message is ``reference`` (and optional extra fields)."""
    data = {"id": "r1", "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": reference}]}
    if answer is not None:
        data["answer"] = answer
    return {**data, **extra}


def score(spec: str, completion, data: dict) -> float:
    return resolve_reward(spec)(completion, data)


# --------------------------------------------------------------------------- reference and extraction


def test_reference_answer_prefers_the_answer_field_then_the_last_assistant_message():
    assert reference_answer(row(answer="7", reference="42")) == "7"
    assert reference_answer(row(reference="42")) == "42"
    with pytest.raises(DataError, match="no reference answer"):
        reference_answer({"id": "x", "messages": [{"role": "user", "content": "q"}]})


@pytest.mark.parametrize("text, expected", [
    ("42", 42), ("The answer is 42.", 42), ("x = -3.5", -3.5), ("it costs $1,234.50", 1234.5),
    ("so \\boxed{\\frac{3}{4}}", 0.75), ("Answer: 7 because 3+4", 7), ("steps...\n#### 1,000", 1000),
    ("<think>2+2=4, 5</think><answer>4</answer>", 4), ("\u22127", -7), ("1e3", 1000), ("first 3 then 8", 8),
    ("\\boxed{12}. Check: 12*2=24", 12), ("no number here", None), ("x2", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_code_prefers_the_last_python_block():
    completion = "Try:\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n```text\nnot code\n```"
    assert extract_code(completion).strip() == "x = 2"
    assert extract_code("```\ny = 3\n```").strip() == "y = 3"
    assert extract_code("z = 4") == "z = 4"


# --------------------------------------------------------------------------- built-ins


def test_builtins_are_registered():
    assert {"numeric_match", "exact_match", "regex_match", "json_schema", "format_tags",
            "code_tests"} <= set(builtin_rewards())


def test_numeric_match():
    assert score("numeric_match", "6*7 = 42", row()) == 1.0
    assert score("numeric_match", "The answer is 42,000", row(answer="42000")) == 1.0
    assert score("numeric_match", "\\boxed{41}", row()) == 0.0
    assert score("numeric_match", "I don't know", row()) == 0.0
    assert score("numeric_match", "", row()) == 0.0
    assert score("numeric_match", "0.333", row(answer="1/3")) == 0.0
    assert score("numeric_match(abs_tol=0.001)", "0.333", row(answer="1/3")) == 1.0
    assert score("numeric_match", "#### 42", row(reference="Six times seven.\n#### 42")) == 1.0
    with pytest.raises(DataError, match="holds no number"):
        score("numeric_match", "42", row(reference="Paris"))


def test_exact_match():
    assert score("exact_match", "  paris. ", row(reference="Paris")) == 1.0
    assert score("exact_match", "<answer>Paris</answer>", row(reference="Paris")) == 1.0
    assert score("exact_match", "The answer is: Paris!", row(reference="Paris")) == 1.0
    assert score("exact_match", "London", row(reference="Paris")) == 0.0
    assert score("exact_match(case_sensitive=True)", "paris", row(reference="Paris")) == 0.0


def test_regex_match_from_row_or_setting():
    assert score("regex_match", "  -12 ", row(pattern=r"-?\d+")) == 1.0
    assert score("regex_match", "-12 apples", row(pattern=r"-?\d+")) == 0.0  # the whole completion
    assert score("regex_match(pattern='[a-z]+')", "abc", row()) == 1.0
    assert score("regex_match(pattern='[a-z]+', flags='i')", "ABC", row()) == 1.0
    assert score("regex_match(pattern='[a-z]+')", "ABC", row()) == 0.0
    assert score("regex_match(pattern='[a-z]+')", "123", row(pattern=r"\d+")) == 1.0  # the row wins
    with pytest.raises(DataError, match="needs a 'pattern'"):
        score("regex_match", "x", row())
    with pytest.raises(DataError, match="invalid pattern"):
        score("regex_match", "x", row(pattern="(unclosed"))


def test_regex_match_gives_up_on_catastrophic_backtracking():
    pytest.importorskip("regex")
    start = time.monotonic()
    assert score("regex_match(timeout_s=0.2)", "a" * 40 + "!", row(pattern=r"(a+)+b")) == 0.0
    assert time.monotonic() - start < 5


def test_json_schema():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert score("json_schema", '{"n": 3}', row(schema=schema)) == 1.0
    assert score("json_schema", 'Here:\n```json\n{"n": 3}\n```\nDone.', row(schema=schema)) == 1.0
    assert score("json_schema", '{"n": "three"}', row(schema=schema)) == 0.0
    assert score("json_schema", '{"n": 3', row(schema=schema)) == 0.0  # not JSON
    assert score("json_schema", "", row(schema=schema)) == 0.0
    assert score("json_schema", '{"n": 3}', row(schema='{"type": "object"}')) == 1.0  # schema as JSON text
    assert score("json_schema(schema={'type': 'array'})", "[1, 2]", row()) == 1.0
    with pytest.raises(DataError, match="invalid JSON schema"):
        score("json_schema", "{}", row(schema={"type": 12}))
    with pytest.raises(DataError, match="needs a 'schema'"):
        score("json_schema", "{}", row())


def test_format_tags():
    good = "<think>6*7 is 42</think>\n<answer>42</answer>\n"
    assert score("format_tags", good, row()) == 1.0
    assert score("format_tags", "<answer>42</answer>", row()) == 0.0
    assert score("format_tags", "<answer>42</answer><think>x</think>", row()) == 0.0
    assert score("format_tags", "Sure! " + good, row()) == 0.0
    assert score("format_tags", good + "<answer>43</answer>", row()) == 0.0
    assert score("format_tags", "<think>x</think><answer>4", row()) == 0.0
    assert score("format_tags(tags=['reasoning', 'final'])", "<reasoning>r</reasoning><final>f</final>", row()) == 1.0


def test_code_tests_scores_the_fraction_of_asserts():
    data = row(tests="assert add(1, 2) == 3\nassert add(-1, 1) == 0\n")
    right = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return 3\n```"
    assert score("code_tests(timeout_s=3)", right, data) == 1.0
    assert score("code_tests(timeout_s=3)", half, data) == 0.5
    assert score("code_tests(timeout_s=3, partial=False)", half, data) == 0.0
    assert score("code_tests(timeout_s=3)", "def add(a, b) return", data) == 0.0  # syntax error
    listed = row(tests=["assert add(2, 2) == 4", "assert add(0, 0) == 0"])
    assert score("code_tests(timeout_s=3)", right, listed) == 1.0
    with pytest.raises(DataError, match="needs a 'tests' field"):
        score("code_tests", right, row())
    with pytest.raises(DataError, match="not valid Python"):
        score("code_tests", right, row(tests="assert (("))


# --------------------------------------------------------------------------- resolving specs


def _one_line_error(spec: str, match: str) -> str:
    with pytest.raises(StageError, match=match) as info:
        resolve_reward(spec)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unknown_or_malformed_specs_are_one_line_errors():
    assert "did you mean 'numeric_match'" in _one_line_error("numeric_mach", "unknown built-in reward")
    _one_line_error("", "empty spec")
    _one_line_error("numeric_match(rel_tol=", "settings must end with")
    _one_line_error("numeric_match(0.1)", "keyword=value")
    _one_line_error("numeric_match(rel_tol=1/0)", "must be a literal")
    assert "known settings: rel_tol, abs_tol" in _one_line_error("numeric_match(tol=0.1)", "unknown setting 'tol'")


USER_MODULE = '''
import math

def length_reward(completion, row, *, target=5):
    """1 when the completion has ``target`` characters."""
    return float(len(completion) == target)

def broken(completion, row):
    return 1 / len(completion)  # ZeroDivisionError on an empty completion

def not_a_number(completion, row):
    return float("nan") if completion else "yes"

def too_big(completion, row):
    return 3.0

def strict(completion, row):
    from tunegraph.errors import DataError
    raise DataError("row has no 'gold' field")

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_rewards_mod.py").write_text(USER_MODULE, encoding="utf-8")
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom\\nsecond line')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_user_reward_by_import_path_with_settings(user_module):
    reward = resolve_reward(f"{user_module}:length_reward")
    assert reward("12345", row()) == 1.0 and reward("1234", row()) == 0.0
    assert resolve_reward(f"{user_module}:length_reward(target=2)")("ab", row()) == 1.0
    assert reward.stats.calls == 2 and reward.stats.errors == 0


def test_user_reward_errors_name_the_spec(user_module):
    _one_line_error("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found")
    _one_line_error("needs_missing_dep:fn", "importing module 'needs_missing_dep' failed: No module named")
    _one_line_error("raises_on_import:fn", "importing module 'raises_on_import' failed: RuntimeError: boom second line")
    assert "did you mean 'length_reward'" in _one_line_error(f"{user_module}:length_rewad", "has no attribute")
    _one_line_error(f"{user_module}:NOT_CALLABLE", "is a int, not a function")
    _one_line_error(f"{user_module}:length_reward(size=3)", "unknown setting 'size'")
    _one_line_error(f"{user_module}:broken(x=1)", "it takes no settings")
    _one_line_error(f"{user_module}:", "package.module:function")


def test_a_failing_user_reward_scores_zero_and_is_counted(user_module):
    reward = resolve_reward(f"{user_module}:broken")
    assert reward("", row()) == 0.0
    assert reward("ab", row()) == 0.5
    assert reward(None, row()) == 0.0  # not even a string
    assert (reward.stats.calls, reward.stats.errors) == (3, 2)
    assert reward.stats.last_error.startswith("TypeError")
    odd = resolve_reward(f"{user_module}:not_a_number")
    assert odd("x", row()) == 0.0 and odd("", row()) == 0.0 and odd.stats.errors == 2
    big = resolve_reward(f"{user_module}:too_big")
    assert big("x", row()) == 1.0 and big.stats.clipped == 1
    with pytest.raises(DataError, match="gold"):  # the data's fault: stops the run with its message
        resolve_reward(f"{user_module}:strict")("x", row())


def test_a_builtin_that_hits_a_bug_scores_zero():
    reward = resolve_reward("numeric_match")
    assert reward(12345, row()) == 0.0  # an int is no completion: counted, not raised
    assert reward.stats.errors == 1


# --------------------------------------------------------------------------- sandbox


def _no_process_matches(marker: str) -> bool:
    """No live process has ``marker`` in its command line (pgrep -f), after a short grace."""
    for _ in range(50):
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        found = [pid for pid in found if int(pid) != os.getpid()]
        if not found:
            return True
        time.sleep(0.05)
    for pid in found:  # leave the machine clean even when the test fails
        try:
            os.kill(int(pid), 9)
        except OSError:
            pass
    return False


def test_sandbox_passes_right_code_and_fails_wrong_code():
    right = run_python("def f(x):\n    return 2 * x\n", "assert f(2) == 4\nassert f(0) == 0", timeout_s=3)
    assert right.passed and (right.tests_passed, right.tests_total) == (2, 2) and not right.timed_out
    wrong = run_python("def f(x):\n    return 3 * x\n", "assert f(2) == 4\nassert f(0) == 0", timeout_s=3)
    assert not wrong.passed and (wrong.tests_passed, wrong.tests_total) == (1, 2)
    assert "AssertionError" in wrong.stderr_tail and wrong.killed_by is None
    printed = run_python("print('hello')", "assert True", timeout_s=3)
    assert printed.passed and printed.stdout_tail.strip() == "hello"


def test_sandbox_exit_zero_is_not_a_pass():
    assert not run_python("import sys\nsys.exit(0)", "assert True", timeout_s=3).passed
    assert not run_python("import os\nos._exit(0)", "assert True", timeout_s=3).passed


def test_sandbox_is_isolated_python_with_a_minimal_environment(monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_TEST_SECRET", "hunter2")
    checks = textwrap.dedent("""\
        import os, sys
        assert sys.flags.isolated == 1 and sys.flags.no_site == 1
        assert set(os.environ) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}, sorted(os.environ)
        assert "hunter2" not in repr(dict(os.environ))
        assert os.environ["HOME"] == os.getcwd()
    """)
    result = run_python("", checks, timeout_s=3)
    assert result.passed, result.stderr_tail


def test_sandbox_kills_an_infinite_loop_within_the_timeout():
    result = run_python("print('started', flush=True)\nwhile True:\n    pass", "assert True", timeout_s=1.0)
    assert result.timed_out and result.killed_by == "timeout" and not result.passed
    assert 0.9 < result.seconds < 3
    assert result.stdout_tail.strip() == "started"


def test_sandbox_huge_allocation_fails_without_harming_the_caller():
    result = run_python("x = bytearray(10**10)", "assert True", timeout_s=3, memory_mb=256)
    assert not result.passed and result.killed_by == "memory" and "MemoryError" in result.stderr_tail
    assert run_python("x = bytearray(10**6)", "assert len(x) == 10**6", timeout_s=3).passed  # still fine


def test_sandbox_file_writes_land_in_a_temp_dir_that_is_removed():
    code = "import os\nopen('out.txt', 'w').write('x' * 100)\nprint(os.path.abspath('out.txt'))"
    result = run_python(code, "assert open('out.txt').read() == 'x' * 100", timeout_s=3)
    assert result.passed, result.stderr_tail
    path = result.stdout_tail.strip()
    assert os.path.basename(os.path.dirname(path)).startswith("tunegraph-sandbox-")
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_sandbox_caps_file_size():
    result = run_python("open('big', 'wb').write(b'x' * (2 * 1024 * 1024))", "assert True", timeout_s=3, file_mb=1)
    assert not result.passed and result.killed_by == "file_size" and "File too large" in result.stderr_tail


def test_sandbox_blocks_the_network():
    code = textwrap.dedent("""\
        import socket
        try:
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        except OSError as error:
            print("refused:", type(error).__name__)
        else:
            print("CONNECTED")
    """)
    result = run_python(code, "assert True", timeout_s=3)
    assert result.passed and result.stdout_tail.strip() == "refused: PermissionError"


def test_sandbox_network_namespace_holds_below_the_python_block():
    """Bypass the Python-level block (reach the real socket class): where the child got its own
    network namespace, a listener on the caller's loopback stays unreachable."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = textwrap.dedent(f"""\
            import ssl
            raw = ssl.SSLSocket.__mro__[-2]  # _socket.socket, the C class the block does not cover
            sock = raw(2, 1)
            sock.settimeout(1)
            try:
                sock.connect(("127.0.0.1", {port}))
            except OSError as error:
                print("unreachable:", error)
            else:
                print("CONNECTED")
        """)
        result = run_python(code, "assert True", timeout_s=3)
    if result.isolation.get("network") != "namespace":
        pytest.skip(f"no network namespace here ({result.isolation}): only the Python-level block holds")
    assert result.passed, result.stderr_tail
    assert result.stdout_tail.startswith("unreachable:")


def test_sandbox_fork_bomb_is_contained():
    code = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()"
    result = run_python(code, "assert True", timeout_s=1.0)
    assert not result.passed and result.seconds < 3
    assert "PermissionError" in result.stderr_tail  # the Python-level guard stops os.fork
    assert _no_process_matches(os.path.basename(result.stdout_tail.strip()))


def _process_limit_holds() -> bool:
    return run_python("", "assert True", timeout_s=3).isolation.get("processes") == "rlimit"


def test_sandbox_process_limit_and_group_kill_below_the_python_guard():
    """A few forks through libc (past the Python guard): RLIMIT_NPROC stops them at the limit, and
    the sleeping children are killed with the group when the run ends."""
    if not _process_limit_holds():
        pytest.skip("RLIMIT_NPROC does not hold here (root that cannot drop privileges)")
    code = textwrap.dedent("""\
        import ctypes, os, time
        print(os.getcwd(), flush=True)
        libc = ctypes.CDLL(None)
        started = 0
        for _ in range(10):
            pid = libc.fork()
            if pid == 0:
                time.sleep(60)
                libc._exit(0)
            started += pid > 0
        print(started, flush=True)
    """)
    result = run_python(code, "assert True", timeout_s=3, max_processes=3)
    workdir, started = result.stdout_tail.split()
    assert result.passed and 1 <= int(started) <= 3
    assert _no_process_matches(os.path.basename(workdir))


def test_sandbox_libc_fork_bomb_is_contained():
    if not _process_limit_holds():
        pytest.skip("RLIMIT_NPROC does not hold here (root that cannot drop privileges)")
    code = "import ctypes, os\nprint(os.getcwd(), flush=True)\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()"
    result = run_python(code, "assert True", timeout_s=1.0, max_processes=8)
    assert result.timed_out and result.seconds < 3.5
    assert _no_process_matches(os.path.basename(result.stdout_tail.strip()))


def test_sandbox_kills_processes_that_left_the_group():
    if run_python("", "assert True", timeout_s=3).isolation.get("network") != "namespace":
        pytest.skip("no network namespace here: a setsid() escapee is only bounded by RLIMIT_NPROC/CPU")
    code = textwrap.dedent("""\
        import ctypes, os, time
        print(os.getcwd(), flush=True)
        libc = ctypes.CDLL(None)
        if libc.fork() == 0:
            libc.setsid()
            time.sleep(60)
            libc._exit(0)
    """)
    result = run_python(code, "assert True", timeout_s=3)
    assert result.passed
    assert _no_process_matches(os.path.basename(result.stdout_tail.strip()))


def test_sandbox_results_do_not_depend_on_the_caller_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_python("import json\nx = json.dumps([1])", "assert x == '[1]'", timeout_s=3).passed
    assert not any(tmp_path.iterdir())
    assert math.isfinite(run_python("", "assert True", timeout_s=3).seconds)
