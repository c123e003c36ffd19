"""Token-based live migration of running generations (ServerlessLLM, OSDI'24 §5).

A generation moves by sending its tokens, never its KV cache: the destination recomputes the
cache by prefill, which for a few thousand tokens costs less than shipping gigabytes of keys and
values. The protocol, multi-round so that the source never stops for the whole recompute:

1. the controller has the destination load the model (skipped when it has an idle instance);
2. the source, told to migrate (:func:`migrate_instance`), sends the destination the tokens so
   far, prompt and generated (:class:`~sllm.messages.PrefillRequest`); the destination extends
   a KV cache kept under a session id (:class:`Sessions`) while the source keeps decoding;
3. again with the tokens generated meanwhile, until at most :data:`HANDOFF_TOKENS` are new (or
   after :data:`MAX_ROUNDS` rounds);
4. the source stops its generation at a token boundary and ends its stream with a
   :class:`~sllm.messages.MigratedMessage` carrying every generated token and the destination;
5. the gateway opens the stream on the destination with those tokens
   (:class:`~sllm.messages.ResumeRequest`); the destination takes the session's cache, prefills
   the few tokens it lacks, yields the tokens the client has not received yet and decodes on.

If the generation ends during the rounds, the source's stream simply finishes and the session is
dropped. If the destination fails during the rounds, the migration is abandoned and the source
keeps decoding (it never paused). Several generations on one instance move one after another:
those that have run (the instance's engine batches them; each has a KV cache to rebuild) by
rounds, one at a time while the others keep decoding, and then the ones that have not started
(they are held while the instance migrates away), with no tokens to move, so that the moved
generations reach the destination first and go on there without waiting behind them.

An instance unloaded under running generations (preemption) hands them over with no destination:
the gateway resumes each one wherever the controller finds room, from the tokens it has.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from transformers import DynamicCache

from invoker.generation import extend_cache
from invoker.instance import ModelInstance
from sllm.errors import Conflict, MigrationFailed, SllmError
from sllm.http import raise_for_error
from sllm.messages import (
    MigrateRequest,
    MigrateResponse,
    PrefillRequest,
    PrefillResponse,
)
from sllm.routes import Invoker, path

log = logging.getLogger(__name__)

HANDOFF_TOKENS = 2
"""The source hands over once at most this many tokens are new since the last round: the
destination's first step then recomputes them together with the next token, which costs about
one decode step, the pause the client sees."""

MAX_ROUNDS = 4
"""Prefill rounds before the source hands over regardless (a destination slower than the
source's decoding would never catch up)."""

SESSION_TTL_S = 60.0
"""Seconds a prepared KV cache waits to be claimed by the resumed stream before it is dropped."""


class Tokens(Protocol):
    """What a migration reads of a running generation (from another thread: a snapshot)."""

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def token_ids(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class Target:
    """Where a handed-over generation goes: an instance, or (None fields) anywhere."""

    invoker_url: str | None = None
    instance_id: str | None = None
    session: str | None = None  # the destination's prepared KV cache, if rounds were sent
    reason: str = "migrated"  # or "preempted"


class Run:
    """One generation on this invoker, as a migration's source sees it.

    Attributes:
        prompt_ids: the prompt's token ids.
        generation: set by the engine once the sequence first runs (None while it waits): its
            ``prompt_ids`` and ``token_ids``.
        handoff: set to stop the generation at the next token boundary.
        target: where it goes once handed over.
        ended: resolves to the generation's finish reason ("migrated" when it handed over).
    """

    def __init__(self, prompt_ids: list[int], loop: asyncio.AbstractEventLoop) -> None:
        self.id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.generation: Tokens | None = None
        self.handoff = threading.Event()
        self.target: Target | None = None
        self.ended: asyncio.Future[str] = loop.create_future()
        self._loop = loop

    def ids(self) -> list[int]:
        """Prompt + tokens generated so far (a snapshot; [] while it has not started)."""
        gen = self.generation
        return [] if gen is None else [*gen.prompt_ids, *list(gen.token_ids)]

    @property
    def handed_over(self) -> bool:
        return self.target is not None

    def hand_over(self, target: Target) -> None:
        """Stop the generation at the next token boundary; its stream then ends with a
        MigratedMessage naming ``target``. A second call does nothing."""
        if self.target is None:
            self.target = target
            self.handoff.set()

    def end(self, reason: str) -> None:
        """From any thread: the generation ended with ``reason``."""
        def settle() -> None:
            if not self.ended.done():
                self.ended.set_result(reason)
        self._loop.call_soon_threadsafe(settle)


@dataclass
class _Prepared:
    instance_id: str
    ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    touched: float = field(default_factory=time.monotonic)


class Sessions:
    """The destination's side: KV caches being recomputed for generations on their way here,
    by session id. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, _Prepared] = {}

    def prefill(self, instance_id: str, instance: ModelInstance, lock: threading.Lock,
                req: PrefillRequest) -> PrefillResponse:
        """Blocking: extend the session's KV cache by ``req.ids`` (creating the session when
        ``req.start`` is 0), holding the instance's ``lock`` (after any generation running on
        it).

        Raises:
            Conflict: ``req.start`` is not where the session's cache ends, or the session
                belongs to another instance.
            InvalidRequest: the ids overflow the context window.
        """
        with self._lock:
            prepared = self._items.get(req.session)
            if prepared is None and req.start == 0:
                prepared = self._items[req.session] = _Prepared(instance_id)
        if prepared is None or prepared.instance_id != instance_id:
            raise Conflict(f"no migration session {req.session!r} on instance {instance_id!r}")
        with lock:
            if req.start != len(prepared.ids):
                raise Conflict(f"session {req.session!r} holds {len(prepared.ids)} positions, "
                               f"not {req.start}")
            # the last id received stays out of the cache: the resumed generation's first step
            # feeds it (with whatever came after it)
            todo = [*prepared.ids[-1:], *req.ids[:-1]]
            t0 = time.perf_counter()
            if todo:
                prepared.cache = extend_cache(instance, prepared.cache, todo)
            prepared.ids.extend(req.ids)
            prepared.touched = time.monotonic()
            return PrefillResponse(cached=len(prepared.ids) - 1, seconds=time.perf_counter() - t0)

    def take(self, session: str, instance_id: str, ids: list[int]
             ) -> tuple[DynamicCache | None, int]:
        """Claim a session's cache for a resumed generation over ``ids`` (prompt + generated):
        ``(cache, positions it covers)`` (all the session received but its last id), or
        ``(None, 0)`` when the session is unknown, of another instance, or prepared for other
        tokens (the generation then recomputes all)."""
        with self._lock:
            prepared = self._items.pop(session, None)
        if (prepared is None or prepared.cache is None or prepared.instance_id != instance_id
                or ids[: len(prepared.ids)] != prepared.ids):
            return None, 0
        return prepared.cache, len(prepared.ids) - 1

    def drop(self, session: str) -> bool:
        """Forget a session; returns whether it existed."""
        with self._lock:
            return self._items.pop(session, None) is not None

    def drop_instance(self, instance_id: str) -> None:
        """Forget every session of an instance (it is being unloaded)."""
        with self._lock:
            for sid in [s for s, p in self._items.items() if p.instance_id == instance_id]:
                del self._items[sid]

    def expire(self, ttl_s: float = SESSION_TTL_S) -> list[str]:
        """Forget sessions untouched for ``ttl_s`` seconds; returns their ids."""
        now = time.monotonic()
        with self._lock:
            old = [s for s, p in self._items.items() if now - p.touched >= ttl_s]
            for sid in old:
                del self._items[sid]
        return old


@dataclass
class _Outcome:
    reason: str  # "migrated", a normal finish reason, or "abandoned"
    rounds: int = 0
    tokens: int = 0
    error: str | None = None


async def _drop_session(http: httpx.AsyncClient, req: MigrateRequest, session: str) -> None:
    try:
        await http.delete(req.to_url + path(Invoker.SESSION, id=req.to_instance, session=session))
    except httpx.HTTPError as e:
        log.info("dropping migration session %s at %s failed: %r", session, req.to_url, e)


async def migrate_run(run: Run, req: MigrateRequest, http: httpx.AsyncClient) -> _Outcome:
    """Move one running generation (one that holds its instance: ``run.generation`` is set) to
    ``req``'s destination by the multi-round protocol (module docstring). Returns how it went;
    never raises for a failing destination (the run then keeps going here)."""
    session = uuid.uuid4().hex
    sent = rounds = 0
    url = req.to_url + path(Invoker.PREFILL, id=req.to_instance)
    while not run.ended.done():
        delta = run.ids()[sent:]
        if (rounds and len(delta) <= HANDOFF_TOKENS) or rounds >= MAX_ROUNDS:
            break
        try:
            r = await http.post(url, json=PrefillRequest(session=session, start=sent,
                                                          ids=delta).model_dump())
            raise_for_error(r)
        except (httpx.HTTPError, SllmError) as e:
            why = e.message if isinstance(e, SllmError) else repr(e)
            log.warning("migration of run %s to %s abandoned: %s", run.id, req.to_instance, why)
            if sent:
                await _drop_session(http, req, session)
            return _Outcome("abandoned", rounds, sent, error=why)
        sent += len(delta)
        rounds += 1
    else:  # finished during the rounds
        if sent:
            await _drop_session(http, req, session)
        return _Outcome(run.ended.result(), rounds, sent)
    run.hand_over(Target(req.to_url, req.to_instance, session if sent else None))
    reason = await run.ended
    if reason != "migrated" and sent:
        await _drop_session(http, req, session)
    return _Outcome(reason, rounds, sent)


async def migrate_instance(runs: dict[str, Run], req: MigrateRequest,
                           http: httpx.AsyncClient) -> MigrateResponse:
    """Move every generation in ``runs`` (an instance's, updated as they start and end) to the
    destination: the running one by rounds, then those waiting for the instance (module
    docstring). The caller keeps waiting generations from starting while this runs, and hands
    over at once the ones that arrive meanwhile. With ``req.limit``, only that many running
    generations move (one that finishes during its rounds does not count), and the others stay.

    Raises:
        MigrationFailed: the destination failed before anything was handed over (everything
            stays here).
    """
    t0 = time.monotonic()
    moved = finished = rounds = tokens = 0
    abandoned: str | None = None
    done: set[str] = set()
    while True:
        left = [r for r in runs.values() if r.id not in done and not r.ended.done()]
        running = [r for r in left if r.generation is not None and not r.handed_over]
        if req.limit is not None and (moved >= req.limit or not running):
            break  # the rest stay
        if not running:
            # the rest wait for the instance (they do not start while it migrates away): they
            # go now, after the running one, so that it reaches the destination first
            for run in left:
                run.hand_over(Target(req.to_url, req.to_instance))
                moved += 1
            break
        run = running[0]
        done.add(run.id)
        outcome = await migrate_run(run, req, http)
        rounds += outcome.rounds
        tokens += outcome.tokens
        if outcome.reason == "migrated":
            moved += 1
        elif outcome.reason == "abandoned":
            abandoned = outcome.error
            break
        else:
            finished += 1
    if abandoned is not None and moved == 0:
        raise MigrationFailed(f"migration to {req.to_instance} at {req.to_url} abandoned: "
                              f"{abandoned}")
    return MigrateResponse(moved=moved, finished=finished, abandoned=abandoned, rounds=rounds,
                           tokens=tokens, seconds=time.monotonic() - t0)
