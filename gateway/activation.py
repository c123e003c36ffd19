"""One activation (invocation) through the gateway: get an instance from the controller, open the
token stream on its invoker, relay tokens, release the instance, and time every hop.

Both the native API and the OpenAI-compatible API run invocations through :func:`start`; they
differ only in how they format tokens (:mod:`gateway.native`, :mod:`gateway.openai`).

Timings (seconds, in :class:`Timings`), measured at the gateway from the request's arrival:

- ``queue``: waiting for a free instance (from the controller's answer);
- ``load``: waiting for the checkpoint load on a cold start (0 when warm);
- ``controller``: the rest of the acquire round trip: the placement decision and the hops;
- ``ttft``: arrival to first token (time to first token);
- ``tpot``: mean time per output token after the first;
- ``total``: arrival to the last token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.metrics import METRICS
from gateway.upstream import InvokerUnreachable, Upstream
from sllm.errors import InvokerError, SllmError, from_body
from sllm.messages import (
    Assignment,
    ChatMessage,
    DoneMessage,
    ErrorMessage,
    GenerateRequest,
    TokenMessage,
)

UNREACHABLE_RETRIES = 2
"""Times an invocation is tried on another instance when its invoker cannot be reached at all
(before any token, so nothing is lost or repeated)."""

@dataclass
class Timings:
    cold_start: bool = False
    tier: str | None = None  # where a cold start loaded the checkpoint from
    queue: float = 0.0
    load: float = 0.0
    controller: float = 0.0
    ttft: float | None = None
    tpot: float | None = None
    total: float = 0.0
    prefill: float = 0.0  # invoker's prefill compute
    decode: float = 0.0  # invoker's decode compute

    def as_dict(self) -> dict[str, Any]:
        return {
            "cold_start": self.cold_start,
            "start": "cold" if self.cold_start else "warm",
            "tier": self.tier if self.cold_start else None,
            "queue_seconds": round(self.queue, 6),
            "load_seconds": round(self.load, 6),
            "controller_seconds": round(self.controller, 6),
            "ttft_seconds": None if self.ttft is None else round(self.ttft, 6),
            "tpot_seconds": None if self.tpot is None else round(self.tpot, 6),
            "total_seconds": round(self.total, 6),
            "prefill_seconds": round(self.prefill, 6),
            "decode_seconds": round(self.decode, 6),
        }


@dataclass
class Activation:
    """A started invocation. Iterate :meth:`tokens`; afterwards ``done`` and ``timings`` are set.

    The instance is released when the token stream ends, fails, or the consumer stops early.
    """

    id: str
    function: str
    assignment: Assignment
    timings: Timings
    _response: httpx.Response
    _upstream: Upstream
    _t0: float
    done: DoneMessage | None = None
    text: list[str] = field(default_factory=list)
    _closed: bool = False

    async def tokens(self) -> AsyncIterator[TokenMessage]:
        """The generated tokens, as the invoker produces them.

        Raises:
            SllmError: the generation failed after the stream began (the invoker's error, or
                InvokerError when the stream broke without a final message).
        """
        first_at: float | None = None
        count = 0
        try:
            async for msg in self._upstream.messages(self._response):
                if isinstance(msg, TokenMessage):
                    now = time.monotonic()
                    if first_at is None:
                        first_at = now
                        self.timings.ttft = now - self._t0
                        METRICS.ttft.labels(self.function, self.timings.cold_start).observe(self.timings.ttft)
                    count += 1
                    self.text.append(msg.text)
                    yield msg
                elif isinstance(msg, DoneMessage):
                    self.done = msg
                    break
                elif isinstance(msg, ErrorMessage):
                    raise from_body(500, {"error": msg.error.model_dump()})
            if self.done is None:
                raise InvokerError("the invoker's stream ended without a final message")
            end = time.monotonic()
            self.timings.total = end - self._t0
            if first_at is not None and count > 1:
                self.timings.tpot = (end - first_at) / (count - 1)
            self.timings.prefill = self.done.prefill_seconds
            self.timings.decode = self.done.decode_seconds
            METRICS.activations.labels(self.function, self.timings.cold_start, "success").inc()
        except SllmError:
            METRICS.activations.labels(self.function, self.timings.cold_start, "error").inc()
            raise
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the token stream and release the instance (once; later calls do nothing).
        Responses also run it as a background task: a streaming body that never started (the
        client left before the first byte) would otherwise never release its slot."""
        if not self._closed:
            self._closed = True
            self._upstream.release_soon(self.assignment.instance_id, self._response)

    def usage(self) -> dict[str, int]:
        """OpenAI-shaped token usage (valid once the stream is done)."""
        p = self.done.prompt_tokens if self.done else 0
        c = self.done.completion_tokens if self.done else 0
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def summary(self) -> dict[str, Any]:
        """The final event / non-streaming body: text, finish reason, usage and timings."""
        return {
            "activation_id": self.id,
            "function": self.function,
            "instance_id": self.assignment.instance_id,
            "text": "".join(self.text),
            "finish_reason": self.done.finish_reason if self.done else None,
            "usage": self.usage(),
            "timings": self.timings.as_dict(),
        }


async def start(
    upstream: Upstream, function: str, *, prompt: str | None = None,
    messages: list[ChatMessage] | None = None, raw: bool = False, max_tokens: int | None = None,
    temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
) -> Activation:
    """Start an invocation of ``function``: acquire an instance (through a cold start if needed)
    and open the token stream. Unset generation parameters take the function's defaults.

    Raises:
        SllmError: before any token, with its HTTP status (FunctionNotFound, TooManyRequests,
            Unavailable, PromptTooLong, InvokerError, ...).
    """
    t0 = time.monotonic()
    act_id = uuid.uuid4().hex
    for attempt in range(UNREACHABLE_RETRIES + 1):
        assignment = await upstream.acquire(function)
        acquire_s = time.monotonic() - t0
        d = assignment.defaults
        try:
            request = GenerateRequest(
                prompt=prompt, messages=messages, raw=raw,
                max_tokens=max_tokens if max_tokens is not None else int(d.get("maxTokens", 128)),
                temperature=temperature if temperature is not None else float(d.get("temperature", 0.0)),
                top_p=top_p if top_p is not None else float(d.get("topP", 1.0)),
                seed=seed,
            )
            response = await upstream.open_stream(assignment, request)
        except InvokerUnreachable as e:
            # the invoker is gone: the controller checks it and marks its instances lost, so the
            # next acquire goes elsewhere; nothing was generated yet, so trying again is safe
            upstream.release_soon(assignment.instance_id, failed=e.message)
            if attempt == UNREACHABLE_RETRIES:
                raise
            await asyncio.sleep(0.2)
            continue
        except BaseException:
            upstream.release_soon(assignment.instance_id)
            raise
        break
    timings = Timings(
        cold_start=assignment.cold, tier=assignment.tier, queue=assignment.queue_seconds,
        load=assignment.load_seconds,
        controller=max(0.0, acquire_s - assignment.queue_seconds - assignment.load_seconds),
    )
    if assignment.cold:
        METRICS.cold_starts.labels(function).inc()
        METRICS.cold_start_seconds.labels(function).observe(assignment.load_seconds)
    return Activation(id=act_id, function=function, assignment=assignment, timings=timings,
                      _response=response, _upstream=upstream, _t0=t0)
