"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``. The ``model`` field names the function. Standard OpenAI clients work against
``http://127.0.0.1:8080/v1`` unchanged.

Every request field is either honoured, or known to change nothing, or refused with 400 naming
it (``param``), never accepted and silently ignored:

- honoured: ``model``, ``messages`` / ``prompt``, ``max_tokens`` (``max_completion_tokens``),
  ``stream``, ``stream_options.include_usage``, and the sampling fields
  (:class:`~sllm.sampling.SamplingOverrides`): ``temperature``, ``top_p``, ``seed``, ``stop``,
  ``top_k``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
  ``min_tokens``, vLLM's ``ignore_eos``, and log probabilities (chat: ``logprobs`` and
  ``top_logprobs`` up to 20; completions: ``logprobs`` up to 5), answered in each API's own
  shape (the model's raw distribution, :class:`~sllm.sampling.SamplingParams`), and ``n`` up
  to :data:`MAX_CHOICES` choices (one activation each, on the first's instance when it has
  room, where the engine computes their prompt once; choice ``i`` of a seeded request is
  seeded ``seed + i``; usage counts the prompt once);
- accepted because they change nothing here (:data:`NO_OP_FIELDS`): ``user``, ``metadata``,
  ``store``, ...;
- refused unless they hold their neutral value (:data:`REFUSED_FIELDS`): what the engine does
  not implement yet (``min_p``, ``best_of`` > 1), ``suffix``, ``echo``,
  ``response_format`` other than text, tools and ``tool_choice`` other than ``none``,
  ``logit_bias``;
- refused: any other field, as OpenAI refuses an unrecognized argument.

A whitespace-only ``prompt`` is refused (400, ``param: prompt``) like the native API's, before
anything is sent upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import activation
from gateway.upstream import Upstream
from sllm import routes
from sllm.errors import InvalidRequest, SllmError
from sllm.http import read_model
from sllm.messages import ChatMessage, Prompt, TokenLogprobs, TokenMessage
from sllm.sampling import MaxTokens, SamplingOverrides, TopLogprobs
from sllm.sse import SSE_HEADERS, event
from sllm.validation import invalid_request


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if _number(neutral):  # 0 and 0.0 are the same; False is not 0
        return _number(value) and value == neutral
    return bool(value == neutral)


def _is(*neutral: Any) -> Callable[[Any], bool]:
    """A check that a value is one of ``neutral``."""
    return lambda value: any(_same(value, n) for n in neutral)


REFUSED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_is(None, 1), "only best_of=1 is supported"),
    "min_p": (_is(None, 0), "min-p sampling is not supported yet (use top_p or top_k)"),
    "echo": (_is(None, False), "echo is not supported"),
    "suffix": (_is(None, ""), "suffix (insertion) is not supported"),
    "logit_bias": (_is(None, {}), "logit_bias is not supported"),
    "response_format": (_is(None, {"type": "text"}),
                        'only {"type": "text"} is supported (no JSON mode or structured output)'),
    "tools": (_is(None, []), "tools are not supported"),
    "functions": (_is(None, []), "functions are not supported"),
    "tool_choice": (_is(None, "none"), "only \"none\" is supported (no tools)"),
    "function_call": (_is(None, "none"), "only \"none\" is supported (no functions)"),
    "modalities": (_is(None, ["text"]), "only [\"text\"] is supported"),
    "audio": (_is(None), "audio output is not supported"),
    "prediction": (_is(None), "predicted outputs are not supported"),
    "reasoning_effort": (_is(None), "not a reasoning model"),
}
"""OpenAI (and vLLM) fields that would change the answer, each with the check that its value is
neutral (changes nothing: accepted) and the reason given when it is not (400, ``param`` = the
field)."""

NO_OP_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
    "safety_identifier",
})
"""OpenAI fields that change nothing about the answer here (identifiers, storage and tier
hints, a tool option with no tools): accepted."""


MAX_CHOICES = 16
"""The most choices (``n``) one request may ask for."""


class _OpenAIRequest(SamplingOverrides):
    """The fields both endpoints take: the sampling fields a call may set
    (:class:`~sllm.sampling.SamplingOverrides`, ``ignore_eos`` being vLLM's extension), the
    function's name as ``model``, the number of choices ``n``, and streaming."""

    # OpenAI clients send optional fields beyond the ones declared here: extra="allow" keeps
    # them, and refuse_unsupported() checks each against REFUSED_FIELDS and NO_OP_FIELDS.
    model_config = ConfigDict(extra="allow", frozen=False)

    model: str = Field(min_length=1)
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        """Refuse a field that would change the answer and is not honoured, or is unknown.

        Raises:
            InvalidRequest: naming the first such field in ``param``.
        """
        for name, value in (self.model_extra or {}).items():
            if name in NO_OP_FIELDS:
                continue
            if name not in REFUSED_FIELDS:
                raise InvalidRequest(f"{name}: unrecognized request argument", param=name)
            neutral, why = REFUSED_FIELDS[name]
            if not neutral(value):
                raise InvalidRequest(f"{name}: {why}", param=name)

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


def _prompt(**fields: Any) -> Prompt:
    """A :class:`~sllm.messages.Prompt` of ``fields``. Raises InvalidRequest naming the field."""
    try:
        return Prompt(**fields)
    except ValidationError as e:
        raise invalid_request(e) from None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[_ChatTurn] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool | None = None  # type: ignore[assignment]  # chat's spelling
    top_logprobs: TopLogprobs | None = None

    def to_prompt(self) -> Prompt:
        """The chat as sllm's prompt. Raises InvalidRequest (a tool turn, too long a chat)."""
        return _prompt(messages=[m.to_message() for m in self.messages])

    def overrides(self) -> SamplingOverrides:
        """As the base's, ``max_completion_tokens`` first (OpenAI's newer name); ``logprobs:
        true`` with ``top_logprobs`` alternatives (0 when unset).

        Raises:
            InvalidRequest: ``top_logprobs`` without ``logprobs: true``.
        """
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs: logprobs must be true when top_logprobs is set",
                                 param="top_logprobs")
        update: dict[str, Any] = {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}
        if self.max_completion_tokens is not None:
            update["max_tokens"] = self.max_completion_tokens
        return super().overrides(**update)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None  # legacy bound

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("only one prompt per request is supported")
        return v

    def to_prompt(self) -> Prompt:
        """The text to complete, as sllm's raw prompt. Raises InvalidRequest (blank, too long)."""
        return _prompt(prompt=self.prompt[0] if isinstance(self.prompt, list) else self.prompt,
                       raw=True)


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "cancelled": "stop"}.get(reason or "", reason)


class _Choices:
    """The activations of one request, one per choice (``n`` of them): the first started by
    :meth:`start`, before the answer (so that what refuses it has its HTTP status), the others
    as the answer is read, each on the first's instance when it has room (``prefer``), so that
    its engine computes their shared prompt once. (They are not all started first: with no
    room beside it, a choice waits for the first's slot, which frees only as the first is
    read.)"""

    def __init__(self, upstream: Upstream, req: _OpenAIRequest, prompt: Prompt,
                 overrides: SamplingOverrides, first: activation.Activation) -> None:
        self._upstream, self._req, self._prompt = upstream, req, prompt
        self._overrides = overrides
        self.acts: list[activation.Activation | None] = [first] + [None] * (req.n - 1)

    @classmethod
    async def start(cls, upstream: Upstream, req: _OpenAIRequest, prompt: Prompt,
                    overrides: SamplingOverrides) -> _Choices:
        """Start the first choice.

        Raises:
            SllmError: as :func:`gateway.activation.start`.
        """
        first = await activation.start(upstream, req.model, prompt, overrides)
        return cls(upstream, req, prompt, overrides, first)

    async def _act(self, i: int) -> activation.Activation:
        """Choice ``i``'s activation, started now if it is not yet: a seeded request's choice
        ``i`` is seeded ``seed + i``; without a seed each draws its own."""
        act = self.acts[i]
        if act is None:
            seed = self._overrides.seed
            act = self.acts[i] = await activation.start(
                self._upstream, self._req.model, self._prompt,
                self._overrides.model_copy(update={"seed": None if seed is None else seed + i}),
                prefer=self._first.assignment.instance_id)
        return act

    @property
    def _first(self) -> activation.Activation:
        first = self.acts[0]
        assert first is not None
        return first

    def _started(self) -> list[activation.Activation]:
        return [a for a in self.acts if a is not None]

    @property
    def id(self) -> str:
        return self._first.id

    def usage(self) -> dict[str, int]:
        """OpenAI's usage: the prompt once, every choice's completion tokens."""
        p = self._first.usage()["prompt_tokens"]
        c = sum(a.usage()["completion_tokens"] for a in self._started())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def extras(self) -> dict[str, Any]:
        return {"usage": self.usage(), "sllm": {
            "activation_id": self.id, "activation_ids": [a.id for a in self._started()],
            "timings": self._first.timings.as_dict()}}

    def finish(self, i: int) -> str | None:
        act = self.acts[i]
        done = act.done if act is not None else None
        return _finish(done.finish_reason if done else None)

    async def finished(self) -> list[list[TokenMessage]]:
        """Run every choice to its end; their tokens.

        Raises:
            SllmError: the first error a choice ended with (the others are stopped).
        """
        async def run(i: int) -> list[TokenMessage]:
            return [tok async for tok in (await self._act(i)).tokens()]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(run(i)) for i in range(len(self.acts))]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        finally:
            await self.aclose()
        return [t.result() for t in tasks]

    async def merged(self) -> AsyncIterator[tuple[int, TokenMessage | None]]:
        """Every choice's tokens as they come, as ``(choice, token)``; ``(choice, None)`` once
        that choice ended.

        Raises:
            SllmError: the first error a choice ended with (the others are stopped).
        """
        queue: asyncio.Queue[tuple[int, TokenMessage | SllmError | None]] = asyncio.Queue(64)

        async def pump(i: int) -> None:
            try:
                async for tok in (await self._act(i)).tokens():
                    await queue.put((i, tok))
                await queue.put((i, None))
            except SllmError as e:
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.acts))]
        try:
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if isinstance(item, SllmError):
                    raise item
                if item is None:
                    left -= 1
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.aclose()

    async def aclose(self) -> None:
        """Close every choice started (a choice's stream releases its slot)."""
        for act in self._started():
            await act.aclose()


def _chat_logprob(lp: TokenLogprobs) -> dict[str, Any]:
    """One token of chat's ``logprobs.content``."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {**entry(lp.token, lp.logprob),
            "top_logprobs": [entry(t.token, t.logprob) for t in lp.top]}


def _completion_logprobs(tokens: list[TokenMessage], offset: int) -> dict[str, Any]:
    """Completions' (legacy) ``logprobs`` of ``tokens``, whose text starts at ``offset``
    characters into the completion."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}
    for tok in tokens:
        assert tok.logprobs is not None
        out["tokens"].append(tok.logprobs.token)
        out["token_logprobs"].append(tok.logprobs.logprob)
        out["top_logprobs"].append({t.token: t.logprob for t in tok.logprobs.top})
        out["text_offset"].append(offset)
        offset += len(tok.text)
    return out


def _streamed(
    req: _OpenAIRequest, choices: _Choices, *, obj: str, cid: str, created: int,
    token_chunk: Callable[[int, TokenMessage | None, str | None], dict[str, Any]],
    first: Callable[[int], dict[str, Any]] | None = None,
) -> StreamingResponse:
    """The SSE reply: ``first(choice)`` for each choice (if given), one chunk per token with
    text (or with log probabilities, when asked for), each choice's last chunk with its finish
    reason once it ends, a usage chunk when ``stream_options.include_usage``, then ``data:
    [DONE]``. ``token_chunk(choice, token, finish_reason)`` builds one chunk (``token`` None
    for a last one)."""
    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                for i in range(len(choices.acts)):
                    yield event(first(i))
            async for i, tok in choices.merged():
                if tok is None:
                    yield event(token_chunk(i, None, choices.finish(i)))
                elif tok.text or tok.logprobs is not None:
                    yield event(token_chunk(i, tok, None))
            if req.include_usage():
                yield event({"id": cid, "object": obj, "created": created, "model": req.model,
                             "choices": [], "usage": choices.usage()})
        except SllmError as e:
            # the status line is gone once streaming began: the error becomes an event
            yield event(e.to_body())
        yield event("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, "X-Activation-Id": choices.id},
                             background=BackgroundTask(choices.aclose))


def _text(tokens: list[TokenMessage]) -> str:
    return "".join(t.text for t in tokens)


async def chat_completions(request: Request, upstream: Upstream) -> Response:
    req = await read_model(request, ChatCompletionRequest)
    req.refuse_unsupported()
    overrides = req.overrides()
    choices = await _Choices.start(upstream, req, req.to_prompt(), overrides)
    cid, created = f"chatcmpl-{choices.id}", int(time.time())
    wants = overrides.logprobs is not None

    def chunk(i: int, delta: dict[str, Any], finish: str | None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}],
        }

    def token_chunk(i: int, tok: TokenMessage | None, finish: str | None) -> dict[str, Any]:
        if tok is None:
            return chunk(i, {}, finish)
        lp = ({"content": [_chat_logprob(tok.logprobs)], "refusal": None}
              if wants and tok.logprobs is not None else None)
        return chunk(i, {"content": tok.text}, finish, lp)

    if req.stream:
        return _streamed(req, choices, obj="chat.completion.chunk", cid=cid, created=created,
                         token_chunk=token_chunk,
                         first=lambda i: chunk(i, {"role": "assistant", "content": ""}, None))
    answers = await choices.finished()
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": req.model,
        "choices": [{
            "index": i, "finish_reason": choices.finish(i),
            "logprobs": {"content": [_chat_logprob(t.logprobs) for t in tokens if t.logprobs],
                         "refusal": None} if wants else None,
            "message": {"role": "assistant", "content": _text(tokens)},
        } for i, tokens in enumerate(answers)],
        **choices.extras(),
    }, headers={"X-Activation-Id": choices.id})


async def completions(request: Request, upstream: Upstream) -> Response:
    req = await read_model(request, CompletionRequest)
    req.refuse_unsupported()
    overrides = req.overrides()
    choices = await _Choices.start(upstream, req, req.to_prompt(), overrides)
    cid, created = f"cmpl-{choices.id}", int(time.time())
    wants = overrides.logprobs is not None
    offsets = [0] * req.n  # characters streamed so far, per choice

    def chunk(i: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def body(*choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": list(choice)}

    def token_chunk(i: int, tok: TokenMessage | None, finish: str | None) -> dict[str, Any]:
        if tok is None:
            return body(chunk(i, "", finish))
        lp = _completion_logprobs([tok], offsets[i]) if wants and tok.logprobs else None
        offsets[i] += len(tok.text)
        return body(chunk(i, tok.text, finish, lp))

    if req.stream:
        return _streamed(req, choices, obj="text_completion", cid=cid, created=created,
                         token_chunk=token_chunk)
    answers = await choices.finished()
    return JSONResponse({**body(*(
        chunk(i, _text(tokens), choices.finish(i),
              _completion_logprobs([t for t in tokens if t.logprobs], 0) if wants else None)
        for i, tokens in enumerate(answers))), **choices.extras()},
        headers={"X-Activation-Id": choices.id})


async def models(request: Request, upstream: Upstream) -> Response:
    r = await upstream.controller("GET", routes.Controller.FUNCTIONS)
    data = [
        {"id": f["name"], "object": "model", "created": int(f["created"]), "owned_by": "sllm"}
        for f in r.json()["functions"]
    ]
    return JSONResponse({"object": "list", "data": data})
