"""Teacher/judge settings and backends: fingerprints, seeding, prefill, errors, and the resumable row cache."""

from __future__ import annotations

import json
import socket

import pytest
from pydantic import ValidationError

from tunegraph.errors import StageError
from tunegraph.llm_backend import (LLMSettings, LocalChatBackend, OpenAIChatBackend, Sampling, _prompt_ids,
                                   open_backend, request_seed)
from tunegraph.row_cache import ChatCounts, RowCache, cached_chat, chat_request
from tunegraph.tasks.judge import JudgeParams
from tunegraph.tasks.self_instruct import SelfInstructParams

HELLO = [{"role": "user", "content": "Say hello to the reader."}]
PROMPTS = [[{"role": "user", "content": f"Write a line about the number {i}."}] for i in range(4)]
SAMPLED = Sampling(max_new_tokens=8, temperature=1.0)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def local(tiny_artifacts) -> LocalChatBackend:
    return LocalChatBackend(tiny_artifacts / "model", batch_size=2)


def test_settings_reject_inconsistent_endpoint_fields():
    with pytest.raises(ValidationError, match="api_key_env is only used with base_url"):
        LLMSettings(model="tiny:llama", api_key_env="KEY")
    with pytest.raises(ValidationError, match="needs the model name"):
        LLMSettings(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValidationError, match="extra"):
        LLMSettings(model="tiny:llama", temprature=0.5)


def test_fingerprint_has_model_and_prompt_but_not_transport_or_key():
    base = JudgeParams(judge={"model": "tiny:llama"})
    retried = JudgeParams(judge={"model": "tiny:llama", "max_retries": 9, "retry_delay_s": 0.1, "timeout_s": 3})
    assert base.fingerprint_params() == retried.fingerprint_params()
    assert JudgeParams(judge={"model": "embedded:smollm2-135m-instruct"}).fingerprint_params() != \
        base.fingerprint_params()
    assert JudgeParams(judge={"model": "tiny:llama"}, rubric="10: perfect").fingerprint_params() != \
        base.fingerprint_params()
    assert "tiny:llama config:" in base.source_identity() and "distilabel 1." in base.source_identity()
    remote = JudgeParams(judge={"model": "m", "base_url": "http://h/v1", "api_key_env": "MY_KEY"})
    assert remote.fingerprint_params()["judge"]["base_url"] == "http://h/v1"
    assert remote.input_files() == [] and remote.source_identity().startswith("distilabel")
    # a local model directory is an input file: its content enters the fingerprint
    assert SelfInstructParams(teacher={"model": "./teacher"}).input_files() == ["./teacher"]


def test_request_seed_depends_on_seed_and_key_only():
    assert request_seed(1, "a:1") == request_seed(1, "a:1")
    assert len({request_seed(1, "a:1"), request_seed(2, "a:1"), request_seed(1, "a:2")}) == 3


def test_local_sampling_is_seeded_and_greedy_ignores_the_seed(local):
    first = local.chat(PROMPTS[:2], SAMPLED, [11, 12])
    assert first == local.chat(PROMPTS[:2], SAMPLED, [11, 12])
    assert first != local.chat(PROMPTS[:2], SAMPLED, [99, 12])
    assert all(isinstance(reply, str) for reply in first)
    greedy = Sampling(max_new_tokens=8)
    assert local.chat(PROMPTS[:2], greedy, [1, 2]) == local.chat(PROMPTS[:2], greedy, [3, 4])


def test_prefill_is_continued_not_answered(local):
    model, tokenizer = local.load()
    prefilled = HELLO + [{"role": "assistant", "content": "Score:"}]
    text = tokenizer.decode(_prompt_ids(tokenizer, prefilled))
    assert text.endswith("<|im_start|>assistant\nScore:")
    assert local.chat([prefilled], Sampling(max_new_tokens=4), [0])[0] is not None


def test_prompt_longer_than_the_context_gives_none_not_an_error(local):
    long = [{"role": "user", "content": "word " * 600}]  # the tiny model has 512 positions
    assert local.chat([long, HELLO], Sampling(max_new_tokens=4), [0, 0])[0] is None


def test_open_backend_needs_exactly_one_model_source(tiny_artifacts, tmp_path):
    with pytest.raises(StageError, match="no teacher model.*params.teacher.model"):
        open_backend(None, None, stage="s", role="teacher", workspace=tmp_path)
    with pytest.raises(StageError, match="both a 'judge' input and judge.model"):
        open_backend(LLMSettings(model="tiny:llama"), tiny_artifacts / "model", stage="s", role="judge",
                     workspace=tmp_path)
    backend = open_backend(None, tiny_artifacts / "model", stage="s", role="judge", workspace=tmp_path)
    assert isinstance(backend, LocalChatBackend) and backend.description == "judge input"


def test_missing_api_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("TUNEGRAPH_TEST_KEY", raising=False)
    settings = LLMSettings(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="TUNEGRAPH_TEST_KEY")
    with pytest.raises(StageError, match="TUNEGRAPH_TEST_KEY, which is not set"):
        OpenAIChatBackend(settings, "gen", "teacher")


def test_api_key_never_reaches_errors_or_params(monkeypatch):
    free_port = unused_port()
    secret = "sk-test-4f9a0c1e-not-a-real-key"
    monkeypatch.setenv("TUNEGRAPH_TEST_KEY", secret)
    params = SelfInstructParams(teacher={"model": "m", "base_url": f"http://127.0.0.1:{free_port}/v1",
                                         "api_key_env": "TUNEGRAPH_TEST_KEY", "max_retries": 1, "retry_delay_s": 0})
    backend = OpenAIChatBackend(params.teacher, "gen", "teacher")
    with pytest.raises(StageError) as failure:
        backend.chat([HELLO], SAMPLED, [0])
    assert secret not in str(failure.value) and secret not in repr(backend.__dict__)
    assert secret not in json.dumps(params.fingerprint_params()) and secret not in params.source_identity()


def test_row_cache_survives_a_cut_line_and_reloads(tmp_path):
    path = tmp_path / "replies.jsonl"
    cache = RowCache(path)
    cache.add_chunk({"a": "one", "b": None})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"key": "c", "rep')  # a crash in the middle of writing a chunk
    reloaded = RowCache(path)
    assert reloaded.resumed == 2 and reloaded.get("a") == "one" and reloaded.get("b") is None
    assert "c" not in reloaded and len(RowCache(None)) == 0


class CountingBackend:
    """The real local backend, counting the batches it is asked for (to see what a resume re-sends)."""

    def __init__(self, inner: LocalChatBackend):
        self.inner, self.batch_size, self.description, self.batches = inner, inner.batch_size, "counting", []

    def chat(self, conversations, sampling, seeds):
        self.batches.append(len(conversations))
        return self.inner.chat(conversations, sampling, seeds)


def test_cached_chat_reuses_whole_chunks_only(local, tmp_path):
    requests = [chat_request(f"line{i}", p) for i, p in enumerate(PROMPTS[:3])]
    path = tmp_path / "replies.jsonl"
    fresh = CountingBackend(local)
    replies = cached_chat(fresh, RowCache(path), requests, SAMPLED, seed=3)
    assert fresh.batches == [2, 1]
    # keep only the first reply on disk: its chunk is incomplete, so both its requests are asked again
    first = path.read_text(encoding="utf-8").splitlines()[0]
    path.write_text(first + "\n", encoding="utf-8")
    resumed, counts = CountingBackend(local), ChatCounts()
    assert cached_chat(resumed, RowCache(path), requests, SAMPLED, seed=3, counts=counts) == replies
    assert resumed.batches == [2, 1] and counts.reused == 0
    again, counts = CountingBackend(local), ChatCounts()
    assert cached_chat(again, RowCache(path), requests, SAMPLED, seed=3, counts=counts) == replies
    assert again.batches == [] and counts.reused == 3
    with pytest.raises(ValueError, match="unique"):
        cached_chat(again, RowCache(None), requests + requests[:1], SAMPLED, seed=3)
