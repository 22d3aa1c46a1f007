"""``tunegraph serve MODEL``: an OpenAI-compatible chat-completions server over a local model.

``MODEL`` is anything a recipe's ``model`` takes (``embedded:NAME``, ``tiny:NAME``, a model directory
such as a stage's output); it is served under that name (or ``--name``), so a recipe stage that
used ``teacher: {model: MODEL}`` locally uses the server by adding ``base_url`` alone.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (``messages``, ``max_tokens`` or
``max_completion_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``, ``stop``; no streaming).
Requests are answered one at a time: generation uses torch's global RNG and every thread. A request
is sampled with its ``seed`` (0 when absent), and ``temperature: 0`` is greedy, so the same request
gets the same reply, and the same reply as the local backend (which also generates each request
alone, whatever its ``batch_size``). ``n`` choices are generated as one batch with the one seed.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunegraph.llm_backend import LocalChatBackend, Sampling, generate_replies

DEFAULT_MAX_TOKENS = 256


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message text; OpenAI's list-of-parts form keeps its text parts."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    # Clients send fields this server ignores (logprobs: false, penalties at 0...): allowed.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False


def _error(status: int, message: str, code: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": "invalid_request_error", "code": code}})


def _cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    positions = [text.find(s) for s in stops if s and s in text]
    return (text[: min(positions)], True) if positions else (text, False)


def create_app(backend: LocalChatBackend, name: str):
    """The FastAPI app serving ``backend`` as model ``name``."""
    from fastapi import FastAPI

    app = FastAPI(title="tunegraph serve", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    model, tokenizer = backend.load()

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tunegraph"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest):
        if request.model != name:
            return _error(404, f"model {request.model!r} is not served here; this server serves {name!r}",
                          "model_not_found")
        if request.stream:
            return _error(400, "streaming is not supported by tunegraph serve; send stream: false", "unsupported")
        temperature = 1.0 if request.temperature is None else request.temperature  # OpenAI's default
        sampling = Sampling(max_new_tokens=request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS,
                            temperature=temperature, top_p=request.top_p or 1.0)
        conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
        with lock:
            replies = generate_replies(model, tokenizer, [conversation] * request.n, sampling, request.seed or 0)
        if replies[0].text is None:
            return _error(400, f"the prompt ({replies[0].prompt_tokens} tokens) plus max_tokens "
                               f"({sampling.max_new_tokens}) exceeds the model's context", "context_length_exceeded")
        choices, completion_tokens = [], 0
        for index, reply in enumerate(replies):
            text, stopped = _cut_at_stop(reply.text, request.stop)
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop" if reply.finished or stopped else "length", "logprobs": None})
            completion_tokens += reply.completion_tokens
        prompt_tokens = replies[0].prompt_tokens
        digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()[:24]
        return {"id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def serve(spec: str, *, workspace: Path, host: str, port: int, name: str | None, threads: int | None,
          dtype: str) -> None:
    """Resolve ``spec``, load it, and serve it until interrupted."""
    import torch
    import uvicorn

    from tunegraph.models import resolve_model

    if threads:
        torch.set_num_threads(threads)
    model_dir = resolve_model(spec, workspace)
    name = name or spec
    app = create_app(LocalChatBackend(model_dir, dtype=dtype, description=name), name)
    print(f"tunegraph serve: {name} ({model_dir}) at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
