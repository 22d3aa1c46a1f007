"""Teachers and judges: one setting, two chat backends (a local transformers model, an OpenAI-compatible endpoint).

A stage that asks an LLM for text names it with one setting (``teacher:`` or ``judge:``)::

    teacher: {model: embedded:smollm2-135m-instruct}            # local: transformers on this machine
    teacher: {model: tiny, base_url: http://127.0.0.1:8000/v1}  # any OpenAI-compatible endpoint
    teacher: {model: gpt-4o-mini, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}

Leave ``model`` out (or the whole setting) and connect a model stage to the stage's ``teacher``/``judge``
input instead: the local backend then runs that artifact. ``tunegraph serve MODEL`` serves a local
model under the name ``MODEL``, so a recipe switches from local to served by adding ``base_url`` alone.

Both backends answer :meth:`ChatBackend.chat`: a batch of conversations in, one reply per
conversation out, ``None`` where no reply could be had (the caller drops and counts that row). The
API key is read from the environment variable the setting names, at call time: it is never a
param, so it never reaches a manifest, MLflow or a log line.

Sampling is seeded per request (:func:`request_seed`), and the local backend generates each request
alone: a reply is a function of its conversation, sampling and seed only. It does not depend on
``batch_size``, on which requests shared a chunk, or on a resume; and the local backend and
``tunegraph serve`` run the same code with the same seed, so a recipe gives the same dataset
either way (same model, dtype and thread count). The price is throughput: a left-padded batch
computes each row's logits a little differently from the row alone (float rounding), so batching
would tie replies to their batch-mates; on 2 CPU cores, batches of 4 would generate about 1.7x
faster with the 135M embedded model.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunegraph.errors import StageError
from tunegraph.models import is_local_path_spec, model_source_identity, resolve_model
from tunegraph.params import StageParams

Conversation = list[dict[str, str]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Strict):
    """How replies are sampled. ``temperature: 0`` is greedy decoding."""

    max_new_tokens: int = Field(128, ge=1, description="most tokens per reply")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; >0 samples (seeded per request)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (when sampling)")


class LLMSettings(_Strict):
    """Which LLM a stage talks to: a local model (``model``) or an endpoint (``base_url`` + ``model``)."""

    model: str | None = Field(None, description="local: embedded:NAME, tiny:NAME or a model directory "
                                                "(default: the stage's model input); endpoint: the model name")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the endpoint's API key")
    batch_size: int = Field(4, ge=1, description="requests per row-cache chunk (what a resume re-sends); endpoint: "
                                                 "concurrent requests. Local requests are generated one at a time, "
                                                 "so replies do not depend on it")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="local model dtype")
    max_retries: int = Field(4, ge=0, description="endpoint: retries of a failed connection")
    retry_delay_s: float = Field(1.0, ge=0, description="endpoint: first retry delay, doubled each retry")
    timeout_s: float = Field(120.0, gt=0, description="endpoint: seconds to wait for one reply")

    # How the endpoint is reached, not what it answers: outside the fingerprint.
    TRANSPORT_FIELDS: ClassVar[frozenset[str]] = frozenset({"max_retries", "retry_delay_s", "timeout_s"})

    @model_validator(mode="after")
    def _endpoint_fields(self) -> "LLMSettings":
        if self.base_url is None and self.api_key_env is not None:
            raise ValueError("api_key_env is only used with base_url")
        if self.base_url is not None and not self.model:
            raise ValueError("an endpoint (base_url) needs the model name it serves in 'model'")
        return self

    @property
    def remote(self) -> bool:
        return self.base_url is not None

    def local_spec(self) -> str | None:
        """The local model spec, or None (an endpoint, or the stage's model input)."""
        return None if self.remote else self.model


class LLMStageParams(StageParams):
    """Params of a stage that talks to LLMs; ``LLM_FIELDS`` names its :class:`LLMSettings` fields.

    Fingerprint: the settings minus transport details; a local model spec adds its source
    identity (package version and file hash, or config hash), a local directory is hashed as an
    input file, and the installed distilabel version stands for its prompt templates and parsers.
    """

    LLM_FIELDS: ClassVar[tuple[str, ...]] = ()

    def fingerprint_params(self) -> dict:
        exclude: dict[str, Any] = {name: True for name in self.NOT_IN_FINGERPRINT}
        for name in self.LLM_FIELDS:
            if getattr(self, name) is not None:
                exclude[name] = set(LLMSettings.TRANSPORT_FIELDS)
        return self.model_dump(mode="json", exclude=exclude)

    def _local_specs(self) -> list[str]:
        specs = (getattr(self, name).local_spec() for name in self.LLM_FIELDS if getattr(self, name) is not None)
        return [spec for spec in specs if spec]

    def input_files(self) -> list[str]:
        local_dirs = [str(Path(spec).expanduser()) if spec.startswith("~") else spec
                      for spec in self._local_specs() if is_local_path_spec(spec)]
        return super().input_files() + local_dirs

    def source_identity(self) -> str:
        parts = [f"distilabel {importlib.metadata.version('distilabel')}"]
        parts += [model_source_identity(spec, Path.cwd()) for spec in self._local_specs()
                  if not is_local_path_spec(spec)]
        return "; ".join(part for part in parts if part)


def request_seed(seed: int, key: str) -> int:
    """The sampling seed of one request: a function of the stage seed and the request's key only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "big")


class ChatBackend(Protocol):
    description: str  # for progress lines: never holds a secret
    batch_size: int

    def chat(self, conversations: list[Conversation], sampling: Sampling, seeds: list[int]) -> list[str | None]:
        """One reply per conversation, ``None`` where the backend could not produce one."""


# --------------------------------------------------------------------------- local transformers model


@dataclass(frozen=True)
class Reply:
    text: str | None  # None: the prompt does not fit the model's context
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # stopped at end of turn (else: hit max_new_tokens)


def generate_replies(model, tokenizer, conversations: list[Conversation], sampling: Sampling, seed: int) -> list[Reply]:
    """Next assistant turn of each conversation, rendered with the tokenizer's chat template.

    A conversation ending with an assistant message is continued (a prefill such as ``"Score:"``);
    the reply is the continuation only. Prompts are left-padded into one batch; sampling draws from
    torch's global RNG seeded with ``seed`` right before ``generate`` (the caller owns the process:
    a stage, or the server under its lock).
    """
    import torch
    from transformers import GenerationConfig

    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    prompts = [_prompt_ids(tokenizer, messages) for messages in conversations]
    fits = [len(p) + sampling.max_new_tokens <= limit for p in prompts]
    batch = [p for p, ok in zip(prompts, fits) if ok]
    texts, lengths, finished = [], [], []
    if batch:
        width = max(len(p) for p in batch)
        pad = tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        greedy = sampling.temperature == 0
        # A full config, so generation_config.json defaults (top_k, repetition penalty) do not leak in.
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                                  temperature=None if greedy else sampling.temperature,
                                  top_p=None if greedy else sampling.top_p, top_k=None,
                                  pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        model.eval()
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        completion = output[:, width:]
        is_eos = completion == tokenizer.eos_token_id
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        completion = completion.masked_fill(after_eos, pad)
        texts = [t.strip() for t in tokenizer.batch_decode(completion, skip_special_tokens=True)]
        lengths = (~after_eos & ~is_eos).sum(-1).tolist()
        finished = is_eos.any(-1).tolist()
    replies, position = [], 0
    for prompt, ok in zip(prompts, fits):
        if not ok:
            replies.append(Reply(None, len(prompt), 0, False))
            continue
        replies.append(Reply(texts[position], len(prompt), int(lengths[position]), bool(finished[position])))
        position += 1
    return replies


def _prompt_ids(tokenizer, messages: Conversation) -> list[int]:
    from tunegraph.training.chat_encoding import prompt_ids

    if messages and messages[-1]["role"] == "assistant":
        text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, messages)


class LocalChatBackend:
    """A model directory run with transformers in this process (loaded on first use)."""

    def __init__(self, model_dir: Path, batch_size: int = 4, dtype: str = "float32", description: str = ""):
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.dtype = dtype
        self.description = description or str(model_dir)
        self._loaded = None

    def load(self):
        if self._loaded is None:
            from tunegraph.modelio import load_model, load_tokenizer

            self._loaded = (load_model(self.model_dir, self.dtype), load_tokenizer(self.model_dir))
        return self._loaded

    def chat(self, conversations: list[Conversation], sampling: Sampling, seeds: list[int]) -> list[str | None]:
        """One reply per conversation, each generated alone with its own seed (as ``tunegraph serve`` does)."""
        if not conversations:
            return []
        model, tokenizer = self.load()
        return [generate_replies(model, tokenizer, [conversation], sampling, seed)[0].text
                for conversation, seed in zip(conversations, seeds)]


# --------------------------------------------------------------------------- OpenAI-compatible endpoint


@functools.lru_cache(maxsize=None)
def import_distilabel():
    """Import distilabel's tasks and LLMs, undoing what the import does to the process.

    Importing distilabel warns about its own pydantic fields (nothing a user can fix) and installs a
    rich traceback hook that prints local variables, which may hold an API key: the hook is put back.
    Its step loggers are limited to errors.
    """
    hook = sys.excepthook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import distilabel.models.llms
        import distilabel.steps.tasks
    sys.excepthook = hook
    # Tasks used outside a distilabel Pipeline (on purpose, see distilabel_task) warn that they have none.
    logging.getLogger("distilabel.step").setLevel(logging.ERROR)
    return distilabel


class OpenAIChatBackend:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, through distilabel's ``OpenAILLM``.

    distilabel's own retries are off: connection failures, timeouts, 429 and 5xx are retried here
    with exponential backoff (``retry_delay_s * 2**attempt``), then fail the stage with a message
    naming the endpoint. A request the endpoint refuses (400, 413, 422) gives ``None`` for that row;
    a refused key (401/403) or an unknown model (404) fails the stage at once.
    """

    def __init__(self, settings: LLMSettings, stage: str, role: str):
        self.settings = settings
        self.stage = stage
        self.role = role
        self.batch_size = settings.batch_size
        self.description = f"{settings.model} at {settings.base_url}"
        key = "not-needed"  # local servers ignore the key, but the client insists on one
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env, "")
            if not key:
                raise StageError(f"stage {stage!r}: {role}.api_key_env names the environment variable "
                                 f"{settings.api_key_env}, which is not set; export the API key there")
        from pydantic import SecretStr

        self._llm = import_distilabel().models.llms.OpenAILLM(model=settings.model, base_url=settings.base_url, api_key=SecretStr(key),
                              max_retries=0, timeout=max(1, round(settings.timeout_s)))
        self._llm.load()

    def chat(self, conversations: list[Conversation], sampling: Sampling, seeds: list[int]) -> list[str | None]:
        import openai

        replies: list[str | None] = [None] * len(conversations)
        pending = list(range(len(conversations)))
        attempt = 0
        while pending:
            results = self._llm.event_loop.run_until_complete(self._request_all(
                [conversations[i] for i in pending], sampling, [seeds[i] for i in pending]))
            retry, last_error = [], None
            for index, result in zip(pending, results):
                if not isinstance(result, BaseException):
                    replies[index] = result["generations"][0]
                elif _transient(result):
                    retry.append(index)
                    last_error = result
                elif isinstance(result, (openai.AuthenticationError, openai.PermissionDeniedError)):
                    raise StageError(f"stage {self.stage!r}: {self.role} endpoint {self.settings.base_url} refused "
                                     f"the API key ({result.status_code}); check {self.role}.api_key_env") from None
                elif isinstance(result, openai.NotFoundError):
                    raise StageError(f"stage {self.stage!r}: {self.role} endpoint {self.settings.base_url} does not "
                                     f"serve model {self.settings.model!r} (404: {_short(result)}); "
                                     f"check {self.role}.model") from None
                elif isinstance(result, openai.APIStatusError):
                    continue  # the endpoint refused this request alone (e.g. too long): its row is dropped
                else:
                    raise result
            if retry and attempt >= self.settings.max_retries:
                raise StageError(f"stage {self.stage!r}: {self.role} endpoint {self.settings.base_url} failed after "
                                 f"{attempt + 1} attempts ({type(last_error).__name__}: {_short(last_error)}); "
                                 f"finished rows are kept: start the server or fix {self.role}.base_url, "
                                 f"then re-run to resume") from None
            if retry:
                time.sleep(self.settings.retry_delay_s * 2**attempt)
                attempt += 1
            pending = retry
        return replies

    async def _request_all(self, conversations: list[Conversation], sampling: Sampling, seeds: list[int]):
        requests = [self._llm.agenerate(input=messages, num_generations=1, max_new_tokens=sampling.max_new_tokens,
                                        temperature=sampling.temperature, top_p=sampling.top_p,
                                        extra_body={"seed": seed})
                    for messages, seed in zip(conversations, seeds)]
        return await asyncio.gather(*requests, return_exceptions=True)


def _transient(error: BaseException) -> bool:
    """Worth retrying: the endpoint is unreachable, slow, overloaded or failing on its side."""
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes timeouts
        return True
    return isinstance(error, openai.APIStatusError) and (error.status_code in (408, 409, 429)
                                                         or error.status_code >= 500)


def _short(error: BaseException | None, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- choosing the backend


def open_backend(settings: LLMSettings | None, model_input: Path | None, *, stage: str, role: str,
                 workspace: Path) -> ChatBackend:
    """The backend ``settings`` names, or the local model connected to the stage's ``role`` input."""
    settings = settings or LLMSettings()
    if settings.remote:
        if model_input is not None:
            raise StageError(f"stage {stage!r}: both a {role!r} input and {role}.base_url are set; "
                             f"remove one (the input is a local model, base_url an endpoint)")
        return OpenAIChatBackend(settings, stage, role)
    if settings.model and model_input is not None:
        raise StageError(f"stage {stage!r}: both a {role!r} input and {role}.model are set; remove one")
    if settings.model:
        return LocalChatBackend(resolve_model(settings.model, workspace), settings.batch_size, settings.dtype,
                                description=settings.model)
    if model_input is None:
        raise StageError(f"stage {stage!r}: no {role} model: set params.{role}.model (e.g. "
                         f"embedded:smollm2-135m-instruct), params.{role}.base_url, or connect a model stage "
                         f"to input {role!r}")
    return LocalChatBackend(model_input, settings.batch_size, settings.dtype, description=f"{role} input")


# --------------------------------------------------------------------------- distilabel tasks


def distilabel_task(name: str, **attributes):
    """The loaded distilabel task ``distilabel.steps.tasks.<name>``, used for its prompt templates and parsers.

    tunegraph drives generation itself (per-request seeds, a resumable row cache, per-row failure
    counts), so the task's ``llm`` is a placeholder that refuses to generate.
    """
    task_class = getattr(import_distilabel().steps.tasks, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = task_class(llm=_placeholder_llm_class()(), **attributes)
        task.load()
    return task


@functools.lru_cache(maxsize=None)
def _placeholder_llm_class():
    LLM = import_distilabel().models.llms.LLM

    class TunegraphDrivenLLM(LLM):
        """Stands in for the task's LLM: the stage calls the chat backend itself."""

        @property
        def model_name(self) -> str:
            return "tunegraph"

        def generate(self, inputs, num_generations: int = 1, **kwargs):
            raise NotImplementedError("tunegraph stages call their chat backend directly")

    return TunegraphDrivenLLM
