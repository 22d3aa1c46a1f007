"""`tunegraph serve` as a real subprocess, and the OpenAI-compatible backend talking to it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import cli_env, stage_ctx
from tunegraph.errors import StageError
from tunegraph.llm_backend import LLMSettings, LocalChatBackend, OpenAIChatBackend, Sampling
from tunegraph.tasks.self_instruct import SelfInstructParams, self_instruct

PROMPTS = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Count to three."}]]
SAMPLED = Sampling(max_new_tokens=8, temperature=1.0)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(spec: str, log_dir: Path, cwd: Path | None = None):
    """``tunegraph serve SPEC`` as a real subprocess on a free port; yields its base URL, stops it after."""
    port = unused_port()
    exe = shutil.which("tunegraph", path=str(Path(sys.executable).parent))
    log = open(log_dir / "serve.log", "w+")
    process = subprocess.Popen([exe, "serve", spec, "--port", str(port), "--threads", "2"], cwd=cwd,
                               stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"tunegraph serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    """The tiny model served under its directory's path (what a recipe's teacher.model would say)."""
    model_dir = str(tiny_artifacts / "model")
    with serving(model_dir, tmp_path_factory.mktemp("serve")) as base_url:
        yield {"base_url": base_url, "model": model_dir}


def test_models_lists_the_served_name(server):
    listed = httpx.get(f"{server['base_url']}/models").json()
    assert [m["id"] for m in listed["data"]] == [server["model"]]


def test_same_seed_same_reply_and_n_choices(server):
    body = {"model": server["model"], "messages": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
    first = httpx.post(f"{server['base_url']}/chat/completions", json=body, timeout=60).json()
    again = httpx.post(f"{server['base_url']}/chat/completions", json=body, timeout=60).json()
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in again["choices"]]
    assert len(first["choices"]) == 2 and first["usage"]["prompt_tokens"] > 0
    other = httpx.post(f"{server['base_url']}/chat/completions", json={**body, "seed": 6}, timeout=60).json()
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
    streamed = httpx.post(f"{server['base_url']}/chat/completions", json={**body, "stream": True}, timeout=60)
    assert streamed.status_code == 400 and "streaming" in streamed.json()["error"]["message"]


def test_endpoint_backend_matches_the_local_backend(server, tiny_artifacts):
    remote = OpenAIChatBackend(LLMSettings(model=server["model"], base_url=server["base_url"]), "gen", "teacher")
    local = LocalChatBackend(tiny_artifacts / "model", batch_size=2)
    served = remote.chat(PROMPTS, SAMPLED, [21, 22])
    # one local call for both (as a chunk of the row cache sends them): each reply is still its own
    assert served == local.chat(PROMPTS, SAMPLED, [21, 22])
    assert served == [local.chat([p], SAMPLED, [s])[0] for p, s in zip(PROMPTS, [21, 22])]
    assert all(reply for reply in served)


def test_a_refused_request_loses_its_reply_only(server):
    remote = OpenAIChatBackend(LLMSettings(model=server["model"], base_url=server["base_url"]), "gen", "teacher")
    too_long = [{"role": "user", "content": "word " * 600}]  # the tiny model has 512 positions: HTTP 400
    replies = remote.chat([too_long, PROMPTS[0]], SAMPLED, [0, 1])
    assert replies[0] is None and replies[1]


def test_unknown_model_fails_the_stage_at_once(server):
    remote = OpenAIChatBackend(LLMSettings(model="nope", base_url=server["base_url"], max_retries=3), "gen", "judge")
    with pytest.raises(StageError, match=r"does not serve model 'nope'.*check judge.model"):
        remote.chat(PROMPTS[:1], SAMPLED, [0])


def test_unreachable_endpoint_retries_then_names_stage_and_url():
    url = f"http://127.0.0.1:{unused_port()}/v1"
    remote = OpenAIChatBackend(LLMSettings(model="m", base_url=url, max_retries=2, retry_delay_s=0.01), "gen", "teacher")
    with pytest.raises(StageError) as failure:
        remote.chat(PROMPTS, SAMPLED, [0, 1])
    message = str(failure.value)
    assert f"stage 'gen': teacher endpoint {url} failed after 3 attempts" in message
    assert "re-run to resume" in message


def test_stage_output_is_the_same_local_or_served(server, tiny_artifacts, tmp_path):
    """The recipe change from local to served is adding base_url: the dataset is byte-identical."""
    common = {"calls_per_round": 2, "instructions_per_call": 2, "min_words": 1, "max_words": 400,
              "sampling": {"max_new_tokens": 24, "temperature": 1.0},
              "answer_sampling": {"max_new_tokens": 8, "temperature": 1.0}}
    outputs = []
    for teacher in ({"model": server["model"], "batch_size": 3},
                    {"model": server["model"], "batch_size": 3, "base_url": server["base_url"]}):
        out = tmp_path / f"out{len(outputs)}"
        out.mkdir()
        result = self_instruct(SelfInstructParams(teacher=teacher, **common), {"dataset": tiny_artifacts / "eval"},
                               out, stage_ctx(tmp_path))
        assert result.metrics["rows"] > 0
        outputs.append((out / "data.jsonl").read_bytes())
    assert outputs[0] == outputs[1]
