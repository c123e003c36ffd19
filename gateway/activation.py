"""One activation (invocation) through the gateway: get an instance from the controller, open the
token stream on its invoker, relay tokens, release the instance, and time every hop.

Both the native API and the OpenAI-compatible API run invocations through :func:`start`; they
differ only in how they format tokens (:mod:`gateway.native`, :mod:`gateway.openai`).

A stream survives its instance moving or dying. The invoker's stream may end with a
:class:`~sllm.messages.MigratedMessage`: a live migration handed the generation to another
instance (ServerlessLLM §5; the gateway opens the stream there, with the tokens so far, and moves
its slot), or the instance was unloaded under it (preemption: the gateway asks the controller
for any instance and resumes there). When the stream breaks off (the invoker died) the gateway
resumes elsewhere from the tokens it has relayed. Tokens are relayed by index, so none is lost
or repeated; every move is listed in the final event (``migrations``). A request with sampling
and no seed gets one here, so that a resumed continuation is drawn as the first one would have
been.

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
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.metrics import METRICS
from gateway.records import ACTIVATIONS
from gateway.upstream import Upstream
from sllm.errors import (
    InstanceNotFound,
    InvokerError,
    InvokerUnreachable,
    SllmError,
    StreamBroken,
    from_body,
)
from sllm.messages import (
    Assignment,
    DoneMessage,
    ErrorMessage,
    GenerateRequest,
    MigratedMessage,
    Prompt,
    ResumeRequest,
    TokenLogprobs,
    TokenMessage,
)
from sllm.sampling import SamplingOverrides

log = logging.getLogger(__name__)

UNREACHABLE_RETRIES = 2
"""Times an invocation is tried on another instance when its invoker cannot be reached at all
(before any token, so nothing is lost or repeated)."""

MAX_MOVES = 8
"""Moves (migrations, preemptions, resumptions after a failure) one activation may make; past
it the stream ends with an error event rather than chase instances forever."""

@dataclass
class Timings:
    cold_start: bool = False
    tier: str | None = None  # where a cold start loaded the checkpoint from
    queue: float = 0.0  # the controller's: waiting for an instance
    instance_queue: float = 0.0  # inside the instance: waiting for its first iteration
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
            "instance_queue_seconds": round(self.instance_queue, 6),
            "load_seconds": round(self.load, 6),
            "controller_seconds": round(self.controller, 6),
            "ttft_seconds": None if self.ttft is None else round(self.ttft, 6),
            "tpot_seconds": None if self.tpot is None else round(self.tpot, 6),
            "total_seconds": round(self.total, 6),
            "prefill_seconds": round(self.prefill, 6),
            "decode_seconds": round(self.decode, 6),
        }


@dataclass
class Move:
    """One move of an activation's generation to another instance."""

    reason: str  # "migrated" (live migration), "preempted" (unloaded), or "failed" (invoker died)
    from_instance: str
    to_instance: str | None = None  # None until a stream is open there
    at_token: int = 0  # tokens the client had received
    moved_tokens: int = 0  # tokens the new instance starts from
    cached: bool = False  # the destination had a KV cache prepared (live migration)
    pause_seconds: float | None = None  # last token before the move -> first token after it
    error: str | None = None  # why the old stream ended, for failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason, "from_instance": self.from_instance,
            "to_instance": self.to_instance, "at_token": self.at_token,
            "moved_tokens": self.moved_tokens, "kv_cache_prepared": self.cached,
            "pause_seconds": None if self.pause_seconds is None else round(self.pause_seconds, 6),
            "error": self.error,
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
    request: GenerateRequest  # what every (re)opened stream is asked for, ``resume`` aside
    _response: httpx.Response
    _upstream: Upstream
    _t0: float
    done: DoneMessage | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # relayed to the client, in order
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # theirs, when asked for
    moves: list[Move] = field(default_factory=list)
    error: SllmError | None = None  # what ended the stream, when it failed
    _started: float = field(default_factory=time.time)  # unix seconds
    _last_release: asyncio.Task[None] | None = None
    _closed: bool = False

    async def tokens(self) -> AsyncIterator[TokenMessage]:
        """The generated tokens, as the invoker produces them, across moves.

        Raises:
            SllmError: the generation failed after the stream began (the invoker's error, or
                InvokerError when the stream broke without a final message and could not be
                resumed, or Unavailable / TooManyRequests when no instance could take it over).
        """
        first_at: float | None = None
        last_at = self._t0
        try:
            while self.done is None:
                ending: MigratedMessage | StreamBroken | None = None
                try:
                    async for msg in self._upstream.messages(self._response):
                        if isinstance(msg, TokenMessage):
                            if msg.index < len(self.token_ids):
                                continue  # relayed before a move already
                            if msg.index > len(self.token_ids):
                                raise InvokerError(f"token {len(self.token_ids)} is missing "
                                                   f"from the stream (got {msg.index})")
                            now = time.monotonic()
                            if first_at is None:
                                first_at = now
                                self.timings.ttft = now - self._t0
                                METRICS.ttft.labels(self.function, self.timings.cold_start).observe(self.timings.ttft)
                            if self.moves and self.moves[-1].pause_seconds is None:
                                moved = self.moves[-1]
                                moved.pause_seconds = now - last_at
                                METRICS.move_pause_seconds.labels(
                                    self.function, moved.reason).observe(moved.pause_seconds)
                            last_at = now
                            self.token_ids.append(msg.token_id)
                            self.text.append(msg.text)
                            if msg.logprobs is not None:
                                self.logprobs.append(msg.logprobs)
                            yield msg
                        elif isinstance(msg, DoneMessage):
                            self.done = msg
                            break
                        elif isinstance(msg, ErrorMessage):
                            raise from_body(500, {"error": msg.error.model_dump()})
                        elif isinstance(msg, MigratedMessage):
                            ending = msg
                            break
                except StreamBroken as e:
                    ending = e
                if self.done is not None:
                    break
                if ending is None:
                    ending = StreamBroken("the invoker's stream ended without a final message")
                await self._move(ending)
            end = time.monotonic()
            self.timings.total = end - self._t0
            count = len(self.token_ids)
            if first_at is not None and count > 1:
                self.timings.tpot = (end - first_at) / (count - 1)
            self.timings.prefill = self.done.prefill_seconds
            self.timings.decode = self.done.decode_seconds
            self.timings.instance_queue = self.done.queued_seconds
            METRICS.activations.labels(self.function, self.timings.cold_start, "success").inc()
        except SllmError as e:
            self.error = e
            METRICS.activations.labels(self.function, self.timings.cold_start, "error").inc()
            raise
        finally:
            await self.aclose()
            ACTIVATIONS.add(self.record())

    async def _move(self, ending: MigratedMessage | StreamBroken) -> None:
        """Go on with the generation on another instance after the current stream ended with
        ``ending``. Raises the error that ended it when no instance can take it over."""
        old = self.assignment
        if len(self.moves) >= MAX_MOVES:
            raise InvokerError(f"the generation moved {MAX_MOVES} times; giving up")
        if isinstance(ending, MigratedMessage):
            if ending.token_ids[: len(self.token_ids)] != self.token_ids:
                raise InvokerError("the migrated tokens do not extend the tokens relayed")
            ids, move = ending.token_ids, Move(ending.reason, old.instance_id)
            logprobs = ending.logprobs
        else:
            ids, move = list(self.token_ids), Move("failed", old.instance_id, error=ending.message)
            logprobs = list(self.logprobs)
        move.at_token, move.moved_tokens = len(self.token_ids), len(ids)
        self.moves.append(move)
        METRICS.moves.labels(self.function, move.reason).inc()
        log.info("activation %s: %s on %s after %d tokens", self.id, move.reason, old.instance_id,
                 len(self.token_ids))
        await self._response.aclose()
        resume = ResumeRequest(token_ids=ids, emitted=len(self.token_ids),
                               logprobs=logprobs if self.request.sampling.logprobs is not None
                               else None)
        if isinstance(ending, MigratedMessage) and ending.instance_id and ending.invoker_url:
            # a live migration: the destination is loaded and holds the recomputed KV cache
            dest = old.model_copy(update={"instance_id": ending.instance_id,
                                          "invoker_url": ending.invoker_url, "cold": False})
            self._release(old.instance_id, moved_to=dest.instance_id)
            try:
                self._response = await self._upstream.open_stream(dest, self.request.model_copy(
                    update={"resume": resume.model_copy(update={"session": ending.session})}))
            except SllmError as e:
                log.warning("activation %s: the migration's destination %s failed (%s); "
                            "resuming elsewhere", self.id, dest.instance_id, e.message)
                self._release(dest.instance_id, failed=e.message)
                move.error = e.message
            else:
                self.assignment = dest
                move.to_instance, move.cached = dest.instance_id, ending.session is not None
                return
        else:
            failed = ending.message if isinstance(ending, StreamBroken) else None
            self._release(old.instance_id, failed=failed)
        await self._resume_anywhere(resume, move)

    async def _resume_anywhere(self, resume: ResumeRequest, move: Move) -> None:
        """Acquire any instance of the function (through a cold start if needed) and open the
        stream there from ``resume``."""
        request = self.request.model_copy(update={"resume": resume})
        self.assignment, _, self._response, _ = await acquire_and_open(
            self._upstream, self.function, lambda _: request, resume=True, release=self._release)
        move.to_instance = self.assignment.instance_id

    def _release(self, instance_id: str, **kwargs: Any) -> None:
        """Give a slot back, after this activation's earlier releases (in order)."""
        self._last_release = self._upstream.release_soon(instance_id, after=self._last_release,
                                                         **kwargs)

    async def aclose(self) -> None:
        """Close the token stream and release the instance (once; later calls do nothing).
        Responses also run it as a background task: a streaming body that never started (the
        client left before the first byte) would otherwise never release its slot."""
        if not self._closed:
            self._closed = True
            self._last_release = self._upstream.release_soon(
                self.assignment.instance_id, self._response, after=self._last_release)

    def usage(self) -> dict[str, int]:
        """OpenAI-shaped token usage (valid once the stream is done)."""
        p = self.done.prompt_tokens if self.done else 0
        c = self.done.completion_tokens if self.done else 0
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def record(self) -> dict[str, Any]:
        """The activation record (:mod:`gateway.records`): the summary, status, and the error
        that ended it, if any."""
        status = "success" if self.done is not None else "error" if self.error else "cancelled"
        return {**self.summary(), "status": status, "started": self._started,
                "error": None if self.error is None else self.error.to_body()["error"]}

    def summary(self) -> dict[str, Any]:
        """The final event / non-streaming body: text, finish reason, usage, timings, the
        moves the generation made, and the tokens' log probabilities when asked for."""
        return {
            "activation_id": self.id,
            "function": self.function,
            "instance_id": self.assignment.instance_id,
            "text": "".join(self.text),
            "finish_reason": self.done.finish_reason if self.done else None,
            "usage": self.usage(),
            "timings": self.timings.as_dict(),
            "migrations": [m.as_dict() for m in self.moves],
            **({"logprobs": [lp.model_dump() for lp in self.logprobs]}
               if self.request.sampling.logprobs is not None else {}),
        }


async def acquire_and_open(
    upstream: Upstream, function: str, request_for: Callable[[Assignment], GenerateRequest], *,
    resume: bool, release: Callable[..., object], prefer: str | None = None,
) -> tuple[Assignment, GenerateRequest, httpx.Response, float]:
    """Acquire an instance of ``function`` and open its token stream with
    ``request_for(assignment)`` (on the instance ``prefer`` when it has a free slot). When the
    invoker cannot be reached, or the instance was
    unloaded under the assignment (preempted), the slot is given back (``release(instance id,
    failed=...)``) and another instance is tried, up to :data:`UNREACHABLE_RETRIES` times:
    nothing was generated there, so trying again is safe (the controller checks an unreachable
    invoker and marks its instances lost, so the next acquire goes elsewhere).

    Returns:
        The assignment, the request sent, the open streaming response, and the monotonic time
        the acquire that succeeded returned (seconds).

    Raises:
        SllmError: what the controller or the invoker answered (after the retries, for an
            unreachable invoker or a vanished instance).
    """
    for attempt in range(UNREACHABLE_RETRIES + 1):
        assignment = await upstream.acquire(function, resume=resume, prefer=prefer)
        acquired_at = time.monotonic()
        try:
            request = request_for(assignment)
            response = await upstream.open_stream(assignment, request)
        except (InvokerUnreachable, InstanceNotFound) as e:
            release(assignment.instance_id,
                    failed=e.message if isinstance(e, InvokerUnreachable) else None)
            if attempt == UNREACHABLE_RETRIES:
                raise
            await asyncio.sleep(0.2)
            continue
        except BaseException:
            release(assignment.instance_id)
            raise
        return assignment, request, response, acquired_at
    raise AssertionError("unreachable")


async def start(upstream: Upstream, function: str, prompt: Prompt,
                overrides: SamplingOverrides, *, prefer: str | None = None) -> Activation:
    """Start an invocation of ``function``: acquire an instance (through a cold start if needed;
    the instance ``prefer`` when it has a free slot) and open the token stream. Sampling fields
    ``overrides`` leaves unset take the function's defaults (the assignment's); a sampled
    request with no seed gets one here.

    Raises:
        SllmError: before any token, with its HTTP status (FunctionNotFound, TooManyRequests,
            Unavailable, PromptTooLong, InvokerError, ...).
    """
    t0 = time.monotonic()
    act_id = uuid.uuid4().hex
    seed = secrets.randbits(63)  # used when the request set none, so that a generation resumed
    # elsewhere samples as it would have

    def request_for(assignment: Assignment) -> GenerateRequest:
        return GenerateRequest(input=prompt,
                               sampling=overrides.resolve(assignment.defaults, seed=seed))

    assignment, request, response, acquired_at = await acquire_and_open(
        upstream, function, request_for, resume=False, release=upstream.release_soon,
        prefer=prefer)
    acquire_s = acquired_at - t0
    timings = Timings(
        cold_start=assignment.cold, tier=assignment.tier, queue=assignment.queue_seconds,
        load=assignment.load_seconds,
        controller=max(0.0, acquire_s - assignment.queue_seconds - assignment.load_seconds),
    )
    if assignment.cold:
        METRICS.cold_starts.labels(function).inc()
        METRICS.cold_start_seconds.labels(function).observe(assignment.load_seconds)
    return Activation(id=act_id, function=function, assignment=assignment, timings=timings,
                      request=request, _response=response, _upstream=upstream, _t0=t0)
