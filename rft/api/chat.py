"""`/v1/models` and `/v1/chat/completions` (plain, and streamed as server-sent events the way the
SDK's `stream=True` reads them).

A conversation is rendered as evaluation renders a data row of OpenAI's format: its `messages`,
the last from the user (chat template when the model has one, else `model.prompt_template` on the
last user message). `temperature` 0 is greedy decoding, the evaluation's; OpenAI's default is 1
(sampling), so ask for 0 to get what evaluation measured. `max_completion_tokens` (or the older
`max_tokens`) defaults to the job's `eval.max_new_tokens`; `stop` sequences cut the text and end it
with `finish_reason` "stop".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rft.api import catalog, serving
from rft.api.errors import invalid, not_found
from rft.api.store import new_id

router = APIRouter()


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted and without effect here: who asks, and storage/bookkeeping options of OpenAI's service.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if part.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
        raise invalid("only text content parts are served (type 'text')", param=where)
    return ""


def conversation(messages: list[Message]) -> dict[str, Any]:
    """The request's messages as a data row `{"prompt", "messages"}`, as evaluation reads OpenAI's format."""
    plain = [{"role": m.role, "content": _text(m.content, f"messages.{i}.content")} for i, m in enumerate(messages)]
    if plain[-1]["role"] != "user":
        raise invalid(
            "the last message must be from the user: a completion continues a user turn, as evaluation renders "
            "OpenAI-format items", param="messages",
        )
    return {"prompt": plain[-1]["content"], "messages": plain}


@router.get("/v1/models")
def list_models(request: Request) -> dict[str, Any]:
    state = request.app.state.rft
    return {"object": "list", "data": catalog.list_models(state.settings, state.store)}


@router.get("/v1/models/{model_id:path}")
def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
    state = request.app.state.rft
    for model in catalog.list_models(state.settings, state.store):
        if model["id"] == model_id:
            return model
    raise not_found(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatRequest) -> Any:
    state = request.app.state.rft
    model = catalog.resolve(state.settings, state.store, body.model)
    row = conversation(body.messages)
    options = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p or 1.0,
        "n": body.n or 1,
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    }
    loaded = await run_in_threadpool(state.models.get, model)
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        prompt_tokens, events = await run_in_threadpool(serving.stream, loaded, row, **options)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(completion_id, created, body.model, options["n"], prompt_tokens, events, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    prompt_tokens, choices = await run_in_threadpool(serving.complete, loaded, row, **options)
    completion_tokens = sum(len(c.ids) for c in choices)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.emitted, "refusal": None, "annotations": []},
             "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(choices)
        ],
        "usage": _usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
        "service_tier": None,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chunks(
    completion_id: str, created: int, model: str, n: int, prompt_tokens: int,
    events: Iterator[tuple[str, int, Any]], include_usage: bool,
) -> Iterator[str]:
    """The SSE events of a streamed completion, as tokens are generated: a role delta per choice,
    text deltas, each choice's finish reason when it ends, the usage chunk when asked for, `[DONE]`."""

    def chunk(choice_list: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": choice_list, **(extra or {})}
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]

    for index in range(n):
        yield chunk(choice(index, {"role": "assistant", "content": ""}))
    for kind, index, value in events:
        if kind == "delta":
            yield chunk(choice(index, {"content": value}))
        elif kind == "finish":
            yield chunk(choice(index, {}, value))
        elif include_usage:
            yield chunk([], {"usage": _usage(prompt_tokens, value)})
    yield "data: [DONE]\n\n"
