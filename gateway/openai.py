"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``. The ``model`` field names the function. Standard OpenAI clients work against
``http://127.0.0.1:8080/v1`` unchanged.

Request fields the runtime cannot honour in a way that changes the answer (``n`` > 1, ``stop``,
``logprobs``, ``tools``) are refused with 400 rather than silently ignored; fields that are only
hints (``user``, ``frequency_penalty`` = 0, ...) are accepted and ignored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import activation
from gateway.sse import SSE_HEADERS, event
from gateway.upstream import Upstream
from sllm.config import MAX_PROMPT_CHARS
from sllm.errors import InvalidRequest, SllmError
from sllm.http import read_model
from sllm.messages import ChatMessage


class _OpenAIRequest(BaseModel):
    # OpenAI clients send many optional fields; unknown ones are accepted (extra="allow") and
    # those that would change the answer are refused in _refuse_unsupported.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens, EOS or not
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    stop: str | list[str] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _OpenAIRequest:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stop:
            raise ValueError("stop: stop sequences are not supported yet")
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "echo"):
            if extra.get(name):
                raise ValueError(f"{name}: not supported")
        if extra.get("best_of") not in (None, 1):
            raise ValueError("best_of: only best_of=1 is supported")
        return self

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class _ChatTurn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart]

    def to_message(self) -> ChatMessage:
        """The turn as sllm's chat message; OpenAI's ``developer`` role is a system message.

        Raises:
            InvalidRequest: a ``tool`` turn (tool calls are not supported).
        """
        if self.role == "tool":
            raise InvalidRequest("messages: tool messages are not supported", param="messages")
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[_ChatTurn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(max_length=MAX_PROMPT_CHARS)

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequest("prompt: only one prompt per request is supported", param="prompt")
            return self.prompt[0]
        return self.prompt


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "cancelled": "stop"}.get(reason or "", reason)


def _streamed(
    req: _OpenAIRequest, act: activation.Activation, *, obj: str, cid: str, created: int,
    token_chunk: Callable[[str, str | None], dict[str, Any]], first: dict[str, Any] | None = None,
) -> StreamingResponse:
    """The SSE reply: ``first`` (if any), one chunk per token with text, a last chunk with the
    finish reason, a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``.
    ``token_chunk(text, finish_reason)`` builds one chunk."""
    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield event(first)
            async for tok in act.tokens():
                if tok.text:
                    yield event(token_chunk(tok.text, None))
            yield event(token_chunk("", _finish(act.done.finish_reason if act.done else None)))
            if req.include_usage():
                yield event({"id": cid, "object": obj, "created": created, "model": req.model,
                             "choices": [], "usage": act.usage()})
        except SllmError as e:
            # the status line is gone once streaming began: the error becomes an event
            yield event(e.to_body())
        yield event("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, "X-Activation-Id": act.id},
                             background=BackgroundTask(act.aclose))


async def _finished(act: activation.Activation) -> str | None:
    """Run the activation to its end; returns the OpenAI finish reason."""
    async for _ in act.tokens():
        pass
    return _finish(act.done.finish_reason if act.done else None)


def _extras(act: activation.Activation) -> dict[str, Any]:
    return {"usage": act.usage(), "sllm": {"activation_id": act.id, "timings": act.timings.as_dict()}}


async def chat_completions(request: Request, upstream: Upstream) -> Response:
    req = await read_model(request, ChatCompletionRequest)
    act = await activation.start(
        upstream, req.model, messages=[m.to_message() for m in req.messages],
        max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
        top_p=req.top_p, seed=req.seed, ignore_eos=req.ignore_eos,
    )
    cid, created = f"chatcmpl-{act.id}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    if req.stream:
        return _streamed(
            req, act, obj="chat.completion.chunk", cid=cid, created=created,
            token_chunk=lambda text, finish: chunk({"content": text} if text else {}, finish),
            first=chunk({"role": "assistant", "content": ""}, None),
        )
    finish = await _finished(act)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": req.model,
        "choices": [{
            "index": 0, "logprobs": None, "finish_reason": finish,
            "message": {"role": "assistant", "content": "".join(act.text)},
        }],
        **_extras(act),
    }, headers={"X-Activation-Id": act.id})


async def completions(request: Request, upstream: Upstream) -> Response:
    req = await read_model(request, CompletionRequest)
    prompt = req.text()
    act = await activation.start(
        upstream, req.model, prompt=prompt, raw=True, max_tokens=req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, ignore_eos=req.ignore_eos,
    )
    cid, created = f"cmpl-{act.id}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    if req.stream:
        return _streamed(req, act, obj="text_completion", cid=cid, created=created, token_chunk=chunk)
    finish = await _finished(act)
    return JSONResponse({**chunk("".join(act.text), finish), **_extras(act)},
                        headers={"X-Activation-Id": act.id})


async def models(request: Request, upstream: Upstream) -> Response:
    r = await upstream.controller("GET", "/v1/functions")
    data = [
        {"id": f["name"], "object": "model", "created": int(f["created"]), "owned_by": "sllm"}
        for f in r.json()["functions"]
    ]
    return JSONResponse({"object": "list", "data": data})
