"""The instance pool: which instances exist, where, in what state, and how busy.

The pool is the leading controller's working memory of instances; etcd holds the durable copy
(one :class:`~sllm.messages.InstanceRecord` per instance). A new instance's record is written
before its load is sent (a controller that dies then finds the pending load and sends it again);
later changes are written by a background flusher, so the hot path of a warm invocation does no
etcd round trip and keeps working while etcd is briefly away.

How an invocation gets an instance (:meth:`InstancePool.acquire`):

1. a loaded instance of the function with fewer than ``targetConcurrency`` invocations in flight
   (the least busy) -> a warm start;
2. else an instance of it that is still starting and has a free slot -> join that cold start;
   while the load runs, the call still takes a slot that a loaded instance frees first (then
   its slot on the starting instance is given back and the load goes on for later calls): a
   call is never bound to a slow load, such as a copy of a big checkpoint from another invoker
   (docs/benchmarks.md §4, batch AH: 6 of ``ours``' 9 slowest calls waited 8.7-11.6 s for one);
3. else, below ``maxInstances``, place a new instance (:func:`controller.placement.place`),
   unloading the least recently used idle instances the decision names -> a cold start; with
   the ``ours`` policy, unless waiting for one of the function's busy instances is expected to
   be shorter than that cold start's estimate (:mod:`controller.service_time`), and the call
   has not yet waited that long (so a wrong guess costs at most twice the cold start);
4. else wait, in a bounded queue (429 past the function's ``maxQueue`` waiters), until an
   instance frees up, at most ``queueTimeout`` seconds (then 503 with Retry-After), as Knative's
   activator buffers requests while a revision scales from zero. Every change wakes every
   waiter, but once a placement of the function found no room, its other waiters do not place
   again until something changes (or :data:`NO_ROOM_RECHECK_S` passes).

Between functions, room goes to the oldest waiting call (first come, first served). A call
of another function *blocks* a call of this one when it waits for room: its function is below
``maxInstances`` and has no instance at all, or its last placement found no invoker with room;
and it started earlier than this call. This call then does not scale out, and when its
function has several instances, it does not take an idle one big enough for the blocking
function: that function's placement unloads it instead. A call of a function with no instance
counts as started one service time earlier (the mean seconds a call of this function holds its
slot, :mod:`controller.service_time`): it overtakes at most the calls that came one round
before it. Without any share, a burst of one function at ``maxInstances`` keeps every slot it
holds until its queue drains, later calls too: other functions' calls waited 13 s in
``bench.replay`` (docs/benchmarks.md, batch F). With the earlier share (a function with no
instance always first, whatever the ages), the most popular function lost three of its four
instances in 3 s to three newcomers while eleven of its calls waited, and they then waited up
to 17 s (batch Y, seed 7).

When the best candidate must first move running inferences away (ServerlessLLM §5-6), what
happens depends on the pool's ``migration`` mode; in ``live`` and ``preempt``, while any call
waits for capacity the best place without migration is taken (:meth:`InstancePool.decide`
says why):

- ``live`` (default): each running instance there migrates: in the same step as the decision
  (no await between them), a destination instance of its function is found idle or started
  elsewhere and holds its slots; then its invoker moves the generations by their tokens, and
  the new instance loads once they have moved. With no destination for one, the best place
  without migration is taken;
- ``preempt`` (the baseline of ``bench.replay``): the running instances are unloaded at once;
  their invocations resume wherever the gateway finds room, recomputing from their tokens;
- ``off``: the best candidate that needs neither is taken, or the call waits.

:meth:`InstancePool.migrate` is also what an operator's ``sllm instance migrate`` calls.

Every acquired slot is given back with :meth:`InstancePool.release`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from controller.autoscaler import InstanceView
from controller.estimator import MigrationCost
from controller.invoker_client import InvokerClient
from controller.placement import (
    ClusterView,
    Estimate,
    InvokerState,
    Placement,
    PlacementRequest,
    Policy,
    Slot,
    bandwidths_of,
    destination_estimates,
    holder_urls,
    place,
)
from controller.service_time import ServiceTimes
from sllm import keys
from sllm.config import (
    INVOKER_LEASE_TTL_S,
    LOST_RETENTION_S,
    MIGRATION_FIXED_S,
    MIGRATION_PER_TOKEN_S,
)
from sllm.errors import (
    Conflict,
    InstanceNotFound,
    MigrationFailed,
    NotLeader,
    SllmError,
    TooManyRequests,
    Unavailable,
)
from sllm.etcd import Etcd
from sllm.manifest import FunctionManifest, device_serves
from sllm.messages import (
    Assignment,
    CheckpointRecord,
    EstimateRecord,
    InstanceRecord,
    InvokerRecord,
    LoadRequest,
    MigrateRequest,
    MigrateResponse,
    PlacementRecord,
)
from sllm.states import FINAL, LOADED, STARTING, InstanceState, check_transition
from sllm.tiers import Tier

log = logging.getLogger(__name__)

S = InstanceState

SUSPECT_S = 2.0 * INVOKER_LEASE_TTL_S
"""Seconds an invoker found unreachable is left out of placement although its record is still
in etcd (its lease expires meanwhile if it is dead; one still renewing after that is alive and
placed again: a false alarm costs its instances, which the orphan sweep unloads)."""

MigrationMode = Literal["live", "preempt", "off"]
MIGRATION_MODES: tuple[MigrationMode, ...] = ("live", "preempt", "off")

MIGRATION_BACKOFF_S = 5.0
"""Seconds placement leaves migration out after a migration meant to make room failed (so a
cluster with no room anywhere does not retry the same doomed migration in a loop)."""

NO_ROOM_RECHECK_S = 0.25
"""Seconds a placement that found no room for a function stands for its other waiters, while
nothing is released or changes state (the bound covers changes that notify no one, such as an
invoker joining)."""

RECENTLY_STOPPED = 1024
"""Ids of stopped instances remembered, so that a late release of one is not an error."""


@dataclass
class LiveInstance:
    """One instance as the controller tracks it in memory."""

    record: InstanceRecord
    in_flight: int = 0  # invocations holding a slot (including those waiting for the load)
    reserved: int = 0  # of which slots held for generations migrating here, not yet claimed
    max_tokens: int = 0  # the function's maxTokens: the migration estimate's bound per inference
    nbytes: int = 0  # its checkpoint's bytes (from its load's answer; 0 until known)
    device: str = "auto"  # the function's spec.resources.device, which its load asks for
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    taken: deque[float] = field(default_factory=deque)  # unix seconds each slot was taken
    error: SllmError | None = None  # why the load failed, once ``loaded`` is set
    # migrations that make room for it: its load is sent once they are done
    after: list[asyncio.Task[tuple[MigrateResponse, InstanceRecord]]] = field(
        default_factory=list)

    @property
    def state(self) -> InstanceState:
        return self.record.state


class InstancePool:
    """Tracks instances and hands out invocation slots. All methods run on one event loop.

    Args:
        etcd: the durable store.
        invokers: HTTP client for invokers.
        list_invokers: returns the live invokers (from etcd, or the last known list).
        model_bytes: checkpoint size of a model in the store root (bytes); raises ModelNotFound.
        policy: the placement policy (``ours`` unless comparing, see controller.placement).
        migration: what to do when room must be made from running instances (module
            docstring).
        manifest_of: a function's current manifest by name (to start a migration's
            destination); without it nothing can migrate.
        clock: unix seconds; a parameter so tests can drive time.
    """

    def __init__(
        self,
        etcd: Etcd,
        invokers: InvokerClient,
        list_invokers: Callable[[], Awaitable[list[InvokerRecord]]],
        model_bytes: Callable[[str], int],
        *,
        policy: Policy = "ours",
        migration: MigrationMode = "live",
        manifest_of: Callable[[str], Awaitable[FunctionManifest]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._etcd = etcd
        self._invokers = invokers
        self._list_invokers = list_invokers
        self._model_bytes = model_bytes
        self.policy: Policy = policy
        self.mode: MigrationMode = migration if manifest_of is not None else "off"
        self.migration = MigrationCost(MIGRATION_PER_TOKEN_S, MIGRATION_FIXED_S)
        self._manifest_of = manifest_of
        self._no_migration_until = 0.0  # monotonic seconds (MIGRATION_BACKOFF_S)
        self._stopped: dict[str, None] = {}  # recently stopped ids, oldest first
        self._clock = clock
        self.instances: dict[str, LiveInstance] = {}
        self.lost: dict[str, InstanceRecord] = {}  # final records kept for LOST_RETENTION_S
        self.tiers: dict[str, dict[str, Tier]] = {}  # model -> invoker id -> tier
        self._urls: dict[str, str] = {}  # live invoker id -> URL, as of the last decision
        self._dead: dict[str, float] = {}  # invoker id -> unix seconds it was found unreachable
        self._changed = asyncio.Condition()
        self._waiting: dict[str, list[float]] = {}  # function -> its queued calls' starts
        self._changes = 0  # counts notifications: "has anything changed since?"
        # function -> (self._changes, monotonic seconds) when a placement of it found no room
        self._no_room: dict[str, tuple[int, float]] = {}
        self._manifests: dict[str, FunctionManifest] = {}  # the last seen, per function
        # called when an invocation starts waiting for capacity (the replicator pauses copies)
        self.on_queue: Callable[[], None] | None = None
        self.service = ServiceTimes()
        self._dirty: set[str] = set()
        self._flush_wakeup = asyncio.Event()
        self._tasks: set[asyncio.Future[object]] = set()
        self._closed = False

    # --- state changes --------------------------------------------------------------------------

    def _set_state(self, live: LiveInstance, new: InstanceState, **changes: object) -> None:
        check_transition(live.record.state, new)
        if new != live.record.state:
            log.info("instance %s (%s): %s -> %s", live.record.id, live.record.function,
                     live.record.state.value, new.value)
        live.record = live.record.model_copy(update={"state": new, **changes})
        self._mark(live.record.id)

    def _mark(self, instance_id: str) -> None:
        self._dirty.add(instance_id)
        self._flush_wakeup.set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write every changed instance record to etcd now (stopped ones are deleted, lost ones
        kept until their retention ends).

        Raises:
            Unavailable: etcd is away (what is not written yet stays to write).
        """
        while self._dirty:
            iid = self._dirty.pop()
            live = self.instances.get(iid)
            record = live.record if live is not None else self.lost.get(iid)
            try:
                if record is None:
                    await self._etcd.delete(keys.Kind.INSTANCE, iid)
                else:
                    await self._etcd.put(keys.Kind.INSTANCE, iid, record)
            except Unavailable:
                self._dirty.add(iid)
                raise

    async def run_flusher(self) -> None:
        """Background task: flush changed records shortly after each change, retrying while etcd
        is away."""
        while True:
            await self._flush_wakeup.wait()
            self._flush_wakeup.clear()
            try:
                await self.flush()
            except Unavailable as e:
                log.warning("instance flush deferred: %s", e)
                await asyncio.sleep(1.0)
                self._flush_wakeup.set()

    async def _notify(self) -> None:
        self._changes += 1
        async with self._changed:
            self._changed.notify_all()

    # --- acquire / release ----------------------------------------------------------------------

    def _candidates(self, manifest: FunctionManifest) -> list[LiveInstance]:
        return [
            i for i in self.instances.values()
            if i.record.function == manifest.name and i.record.model == manifest.spec.model
            and (i.state in LOADED or i.state in STARTING)
        ]

    async def acquire(self, manifest: FunctionManifest, deadline_s: float | None = None, *,
                      may_migrate: bool = True) -> Assignment:
        """A slot on an instance of the function, starting one if needed (see module docstring).

        Args:
            manifest: the function's manifest.
            deadline_s: seconds this call may wait for capacity and loading together (default:
                the function's ``queueTimeout``).
            may_migrate: whether a new instance may be placed by moving running instances away
                (false for a generation that was itself moved: moves must not chain).

        Raises:
            TooManyRequests: the function's wait queue is full.
            Unavailable: no instance could be had before the deadline, or no invoker can host it.
            SllmError: the load failed (ModelNotFound, CheckpointError, InvokerError).
        """
        scaling = manifest.spec.scaling
        deadline_s = scaling.queueTimeout if deadline_s is None else deadline_s
        start = time.monotonic()
        deadline = start + deadline_s
        target = scaling.targetConcurrency
        queue_s = 0.0
        queued = False
        joined: LiveInstance | None = None  # a starting instance holding a slot for this call
        t_join = 0.0
        try:
            while True:
                if self._closed:
                    raise NotLeader("this controller stopped leading; ask the new leader",
                                    retry_after=1)
                if joined is not None and joined.loaded.is_set():
                    live, joined = joined, None
                    live.in_flight -= 1
                    if live.error is not None:
                        raise live.error
                    if live.state in LOADED:
                        self._take(live)
                        return self._assignment(manifest, live, cold=True, queue_s=queue_s,
                                                load_s=time.monotonic() - t_join)
                    continue  # its invoker died while loading: place again
                cands = self._candidates(manifest)
                loaded = _with_free_slot(cands, target)
                blocker = self._blocker(manifest.name, start) if cands else None
                if blocker is not None and len(cands) > 1:
                    # room goes to the older call: idle instances it could use are left to it
                    need = self._manifests[blocker].spec.resources.memory
                    loaded = [i for i in loaded if i.in_flight or i.record.memory_bytes < need]
                if loaded:
                    if joined is not None:  # a loaded instance freed a slot before the load ended
                        joined.in_flight -= 1
                        queue_s += time.monotonic() - t_join
                        joined = None
                    live = min(loaded, key=lambda i: i.in_flight)
                    self._take(live)
                    return self._assignment(manifest, live, cold=False, queue_s=queue_s, load_s=0.0)
                if joined is None:
                    loading = [i for i in cands if i.state in STARTING and i.in_flight < target]
                    live = min(loading, key=lambda i: i.in_flight) if loading else None
                    if live is not None:
                        live.in_flight += 1  # before any await: the slot is this call's
                    elif (len(cands) < scaling.maxInstances and blocker is None
                          and not self._known_full(manifest.name)):
                        # reserves a slot on the new instance before its first await
                        live = await self.start_instance(
                            manifest, reserve=True, may_migrate=may_migrate,
                            unless_wait=self._expected_wait(manifest, cands, queued),
                            waited_s=queue_s)
                        now = self._candidates(manifest)
                        if live is None and (len(now) > len(cands) or _with_free_slot(now, target)):
                            continue  # another call started one, or a slot freed, meanwhile
                    if live is not None:
                        joined, t_join = live, time.monotonic()
                        continue  # it may have loaded (or failed) during start_instance's awaits
                if joined is not None:
                    # Wait for its load, or for a loaded instance to free a slot first (then
                    # the load goes on for later calls, with this call's slot given back).
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:  # the finally gives the slot back
                        raise Unavailable(
                            f"function {manifest.name!r} is still loading after {deadline_s:.0f} s",
                            retry_after=5,
                        )
                    await self._wait_for_change(min(remaining, 1.0))
                    continue
                # No capacity: wait for a release or a state change.
                if not queued:
                    if self.waiting(manifest.name) >= scaling.maxQueue:
                        raise TooManyRequests(
                            f"function {manifest.name!r} has {scaling.maxQueue} invocations "
                            "waiting already", retry_after=1,
                        )
                    self._waiting.setdefault(manifest.name, []).append(start)
                    self._manifests[manifest.name] = manifest
                    queued = True
                    if self.on_queue is not None:
                        self.on_queue()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(
                        f"no instance of {manifest.name!r} became free within {deadline_s:g} s",
                        retry_after=1,
                    )
                t_wait = time.monotonic()
                # bounded, so a notification lost between check and wait costs <= 1 s
                await self._wait_for_change(min(remaining, 1.0))
                queue_s += time.monotonic() - t_wait
        finally:
            if joined is not None:  # gave up on the load (deadline, cancelled): the slot goes back
                joined.in_flight -= 1
            if queued:
                self._waiting[manifest.name].remove(start)
                if not self._waiting[manifest.name]:  # only functions with waiters stay listed
                    del self._waiting[manifest.name]
                    self._no_room.pop(manifest.name, None)

    async def _wait_for_change(self, timeout_s: float) -> None:
        """Wait until the pool notifies a change (every release, state change and end of a
        load notifies) or ``timeout_s`` seconds pass."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()

    def _known_full(self, function: str) -> bool:
        """Whether a placement of ``function`` found no room since the last change (and less
        than :data:`NO_ROOM_RECHECK_S` ago): its other waiters then do not place again. Each
        release wakes every waiter; without this, each would list the invokers in etcd and
        decide, to the same answer (batch K of docs/benchmarks.md: 1,678 such decisions in
        one 90 s run, most in its bursts, on the cores the generations need)."""
        seen = self._no_room.get(function)
        return (seen is not None and seen[0] == self._changes
                and time.monotonic() - seen[1] < NO_ROOM_RECHECK_S)

    def waiting(self, function: str) -> int:
        """Invocations of ``function`` waiting for capacity now."""
        return len(self._waiting.get(function, ()))

    def queued(self) -> int:
        """Invocations of all functions waiting for capacity now."""
        return sum(len(w) for w in self._waiting.values())

    def _blocker(self, function: str, since: float) -> str | None:
        """Another function with a call that waits for room and started before a call of
        ``function`` that started at ``since`` (monotonic seconds), or None: the call gives way
        to it (module docstring: the oldest call first). Its oldest call's start counts one
        mean service time of ``function`` earlier when it has no instance at all (unknown mean:
        it always goes first). The oldest such function is returned."""
        others = [f for f in self._waiting if f != function]  # each queued with its manifest
        if not others:
            return None
        count: dict[str, int] = {}
        for i in self.instances.values():
            if i.state in LOADED or i.state in STARTING:
                count[i.record.function] = count.get(i.record.function, 0) + 1
        credit = self.service.mean(function)
        best: tuple[float, str] | None = None
        for f in others:
            have = count.get(f, 0)
            if have >= self._manifests[f].spec.scaling.maxInstances:
                continue  # it waits for its own instances, not for room
            if have and f not in self._no_room:
                continue  # it waits by choice (a busy instance is expected sooner)
            oldest = min(self._waiting[f])
            if not have:
                oldest -= float("inf") if credit is None else credit
            if oldest < since and (best is None or oldest < best[0]):
                best = (oldest, f)
        return None if best is None else best[1]

    def _expected_wait(self, manifest: FunctionManifest, cands: list[LiveInstance],
                       queued: bool) -> float | None:
        """``ours``: seconds until one of the function's busy instances frees a slot for a new
        invocation (None: unknown, or another policy)."""
        if self.policy != "ours":
            return None
        started = [t for i in cands if i.state in LOADED for t in i.taken]
        started += [i.record.ready_by or 0.0 for i in cands if i.state in STARTING
                    for _ in range(i.in_flight)]
        ahead = self.waiting(manifest.name) - int(queued)
        return self.service.expected_wait(manifest.name, started, self._clock(), ahead)

    def _take(self, live: LiveInstance) -> None:
        live.in_flight += 1
        live.taken.append(self._clock())
        if live.state == S.IDLE:
            self._set_state(live, S.ACTIVE)

    def _assignment(
        self, manifest: FunctionManifest, live: LiveInstance, *, cold: bool, queue_s: float,
        load_s: float,
    ) -> Assignment:
        return Assignment(
            function=live.record.function, model=live.record.model, instance_id=live.record.id,
            invoker_url=live.record.invoker_url, cold=cold, queue_seconds=queue_s,
            load_seconds=load_s, tier=live.record.tier, defaults=manifest.spec.generation.sampling(),
        )

    async def release(self, instance_id: str, *, failed: str | None = None,
                      moved_to: str | None = None) -> None:
        """Give back a slot taken by :meth:`acquire`. ``failed`` says the invoker could not be
        reached: the pool checks it at once and marks its instances lost if it is down.
        ``moved_to`` says the invocation's generation migrated to that instance, whose slot
        :meth:`migrate` reserved already (the slot is released there when the stream ends).

        Raises:
            InstanceNotFound: an unknown id (a lost or recently stopped instance's id is not an
                error).
        """
        live = self.instances.get(instance_id)
        if live is None:
            if instance_id in self.lost or instance_id in self._stopped:
                return
            raise InstanceNotFound(f"no instance {instance_id!r}")
        if moved_to is not None:
            self._claim(moved_to)
        if live.taken:
            began = live.taken.popleft()
            if moved_to is None:
                self.service.observe(live.record.function, self._clock() - began)
        live.in_flight = max(0, live.in_flight - 1)
        if live.in_flight == 0:
            live.taken.clear()  # slots reserved for migrations were never stamped
            if live.state == S.ACTIVE:
                self._set_state(live, S.IDLE, last_used=self._clock())
            elif live.state == S.DRAINING:
                await self.stop(instance_id, reason=live.record.reason or "drained")
        if failed is not None:
            self._spawn(self.check_invoker(live.record.invoker_id, live.record.invoker_url, failed))
        await self._notify()

    async def check_invoker(self, invoker_id: str, url: str, why: str) -> bool:
        """Probe an invoker a client could not reach; when it does not answer, mark its
        instances lost at once rather than waiting for its lease to expire. Returns whether it
        is alive."""
        if await self._invokers.healthy(url):
            return True
        self._dead[invoker_id] = self._clock()
        self.lose_invoker(invoker_id, f"invoker {invoker_id} unreachable: {why}")
        await self._notify()
        return False

    # --- placement and loading ------------------------------------------------------------------

    def view(self, invokers: Iterable[InvokerRecord], model: str | None = None) -> ClusterView:
        """The scheduler's view of the live ``invokers`` and this pool's instances, for placing
        an instance of ``model`` (its busy instances are pinned: never moved for it)."""
        view = ClusterView(tiers=self.tiers)
        now = self._clock()
        self._urls = {}
        for rec in invokers:
            dead_at = self._dead.get(rec.id)
            if dead_at is not None and dead_at >= rec.started and now - dead_at < SUSPECT_S:
                continue  # found unreachable, and its lease has not expired yet
            self._urls[rec.id] = rec.url
            view.invokers[rec.id] = InvokerState(
                id=rec.id, url=rec.url, memory_bytes=rec.memory_bytes,
                bandwidths=bandwidths_of(rec.bandwidths),
            )
        busy: list[tuple[LiveInstance, InvokerState, Slot]] = []
        idle_at: dict[str, set[str]] = {}  # function -> invoker ids with an idle instance of it
        for live in self.instances.values():
            inv = view.invokers.get(live.record.invoker_id)
            if inv is None or live.state in FINAL:
                continue
            inv.in_flight += live.in_flight
            if live.state in STARTING:
                slot = Slot(live.record.memory_bytes, "starting", ready_by=live.record.ready_by or 0.0,
                            model=live.record.model)
            elif live.state == S.IDLE and live.in_flight == 0:
                slot = Slot(live.record.memory_bytes, "idle", last_used=live.record.last_used or 0.0)
                idle_at.setdefault(live.record.function, set()).add(inv.id)
            elif live.state not in LOADED or live.record.model == model or live.reserved:
                # (one holding slots for generations migrating to it stays where it is)
                slot = Slot(live.record.memory_bytes, "pinned")
            else:
                slot = Slot(live.record.memory_bytes, "busy",
                            tokens=max(1, live.in_flight) * live.max_tokens)
                busy.append((live, inv, slot))
            inv.put(live.record.id, slot)
        # where a busy instance would move to depends on every invoker's room: known only now
        dest: dict[tuple[str, int], list[tuple[float, str]]] = {}
        for live, inv, slot in busy:
            inv.put(live.record.id, replace(  # replaced: the aggregates count it
                slot, move_s=self._move_seconds(live, inv, view, dest, idle_at, now)))
        return view

    def _move_seconds(self, live: LiveInstance, inv: InvokerState, view: ClusterView,
                      dest: dict[tuple[str, int], list[tuple[float, str]]],
                      idle_at: dict[str, set[str]], now: float) -> float:
        """Estimated seconds until a migration destination for the busy ``live`` is loaded, as
        :meth:`migrate` finds one: 0 when its function has an idle instance on another invoker,
        else the best startup estimate on another invoker with room
        (:func:`controller.placement.destination_estimates`, kept in ``dest`` per model and
        memory for this view). With no room anywhere, a copy from the store root at ``inv``'s
        bandwidth (placement then finds nowhere for it to go anyway). The checkpoint's size
        comes from the instance's load, so a decision does no I/O per busy instance."""
        rec = live.record
        if idle_at.get(rec.function, set()) - {rec.invoker_id}:
            return 0.0
        if not live.nbytes:  # adopted from an earlier controller: ask the store root, once
            try:
                live.nbytes = self._model_bytes(rec.model)
            except SllmError:
                return 0.0
        key = (rec.model, rec.memory_bytes)
        if key not in dest:
            dest[key] = destination_estimates(view, rec.model, live.nbytes, rec.memory_bytes,
                                              now=now)
        return next((s for s, i in dest[key] if i != rec.invoker_id),
                    live.nbytes * inv.seconds_per_byte[2])

    def used_bytes(self) -> dict[str, int]:
        """Invoker id -> instance memory reserved on it (bytes)."""
        used: dict[str, int] = {}
        for i in self.instances.values():
            if i.state not in FINAL:
                used[i.record.invoker_id] = used.get(i.record.invoker_id, 0) + i.record.memory_bytes
        return used

    def decide(self, manifest: FunctionManifest, invokers: list[InvokerRecord], *,
               may_migrate: bool = True) -> Placement | None:
        """The placement decision for a new instance of ``manifest``, or None when it must wait
        for capacity. A decision that needs running instances moved away is kept in ``live``
        and ``preempt`` modes, unless ``may_migrate`` is false, a migration failed in the last
        :data:`MIGRATION_BACKOFF_S`, or any call waits for capacity (this one included, once it
        has waited); otherwise it is replaced by the best one without, and with none the
        instance waits.

        Why not while calls wait: ServerlessLLM §5-6 charges a migration to the new instance's
        startup estimate only, as if the moved inference's destination and its KV-cache
        recompute used capacity nobody else wants. A waiting call says there is none: the
        destination's load and the recompute then take compute and memory from the calls in
        flight and the ones waiting (docs/benchmarks.md §4, batches AE-AG: in the overloads,
        with migration on, local loads took two to three times as long).

        Only the invokers whose device serves the function's ``spec.resources.device`` are
        candidates (:func:`sllm.manifest.device_serves`).

        Raises:
            Unavailable: no running invoker has the function's device, or no such invoker's
                memory budget could ever hold it.
            ModelNotFound: the model left the store root.
        """
        device = manifest.spec.resources.device
        serving = [i for i in invokers if device_serves(device, i.device)]
        if not serving:
            raise Unavailable(
                f"function {manifest.name!r} asks for device {device!r}; no running invoker has "
                f"one (they run on {', '.join(sorted({i.device for i in invokers})) or 'nothing'})",
                param="spec.resources.device", retry_after=30,
            )
        need = manifest.spec.resources.memory
        largest = max(i.memory_bytes for i in serving)
        if need > largest:
            raise Unavailable(
                f"function {manifest.name!r} needs {need} bytes of instance memory; the largest "
                f"invoker has {largest}", retry_after=30,
            )
        # built over every invoker (a checkpoint is fetched from any peer), placed among those
        view = self.view(invokers, manifest.spec.model)
        for rec in invokers:
            if not device_serves(device, rec.device):
                view.invokers.pop(rec.id, None)
        req = PlacementRequest(model=manifest.spec.model, nbytes=self._model_bytes(manifest.spec.model),
                               memory_bytes=need)
        decision = place(view, req, policy=self.policy, migration=self.migration)
        if decision is not None and decision.migrate and not (
                may_migrate and self.mode != "off" and not self._waiting
                and time.monotonic() >= self._no_migration_until):
            log.info("best place for %s needs migrating %s away (%.3f s); taking the best place "
                     "without%s", manifest.name, ", ".join(decision.migrate),
                     decision.chosen.total_s,
                     f" ({self.queued()} calls wait for capacity)" if self._waiting else "")
            fallback = place(view, req, policy=self.policy, migration=None)
            if fallback is not None:
                # keep every candidate's estimate, migration ones included
                decision = Placement(
                    policy=fallback.policy, invoker=fallback.invoker, chosen=fallback.chosen,
                    evict=fallback.evict, migrate=(), candidates=decision.candidates,
                    considered=decision.considered,
                )
            else:
                decision = None
        return decision

    async def start_instance(self, manifest: FunctionManifest, *, reserve: bool = False,
                             may_migrate: bool = True, unless_wait: float | None = None,
                             waited_s: float = 0.0) -> LiveInstance | None:
        """Place a new instance of the function and start loading it in the background; None
        when every invoker is full of busy instances (the caller waits for a release) or the
        function reached ``maxInstances`` meanwhile. With ``reserve`` the new instance counts
        one invocation in flight from the moment it exists (the caller's), and None is also
        returned when a loaded instance of the function freed a slot while the invokers were
        listed: the caller takes that slot, and placement does not unload that very instance
        as idle to start another (seen in docs/benchmarks.md batch Y). ``unless_wait`` is
        the expected wait (seconds) for a busy instance of the function: it also returns None
        when that, and the ``waited_s`` seconds the caller has waited so far, are both shorter
        than the new instance's startup estimate (nothing is evicted then).

        The decision, the unloads it names and, when it moves running instances away, their
        destinations are taken in one step, with no await between them (:meth:`_place_now`):
        no other placement can take the room a destination was counted on. (A destination
        placed after the awaits of the migration found its room taken 1-7 ms after the
        decision: 13 of the 18 migrations of docs/benchmarks.md batch U were abandoned so.)

        Raises:
            Unavailable: no invoker runs, or none could ever hold the instance.
            ModelNotFound: the model left the store root.
        """
        changes = self._changes  # before the await: a change meanwhile voids a "no room"
        self._manifests[manifest.name] = manifest
        invokers = await self._list_invokers()
        if not invokers:
            raise Unavailable("no invoker is running", retry_after=5)
        if may_migrate and self.mode == "live":
            await self._learn_manifests()  # a mover's destination is placed without an await
        # no await from here until the instance (and its movers' destinations) exist
        scaling = manifest.spec.scaling
        cands = self._candidates(manifest)
        if len(cands) >= scaling.maxInstances:
            return None  # another call started one while this one listed the invokers
        if reserve and _with_free_slot(cands, scaling.targetConcurrency):
            return None  # a slot freed meanwhile: the caller takes it (a warm start)
        return self._place_now(manifest, invokers, reserve=reserve, may_migrate=may_migrate,
                               unless_wait=unless_wait, waited_s=waited_s, changes=changes)

    async def _learn_manifests(self) -> None:
        """Fetch the manifest of every function with a loaded instance that this pool has not
        seen yet (adopted from an earlier controller), so that a migration's destination can
        be placed in the same step as the decision that moves it. Usually none."""
        if self._manifest_of is None:
            return
        for function in {i.record.function for i in self.instances.values()
                         if i.state in LOADED and i.record.function not in self._manifests}:
            try:
                self._manifests[function] = await self._manifest_of(function)
            except SllmError as e:  # deleted meanwhile: its instances do not move
                log.info("no manifest for %s (%s): its instances cannot migrate", function,
                         e.message)

    def _place_now(self, manifest: FunctionManifest, invokers: list[InvokerRecord], *,
                   reserve: bool, may_migrate: bool, unless_wait: float | None = None,
                   waited_s: float = 0.0, changes: int | None = None, send: bool = True
                   ) -> LiveInstance | None:
        """:meth:`start_instance` after its awaits: decide among ``invokers``, unload the idle
        instances the decision names, move the running ones away (``live`` mode: a destination
        for each is found or started now, its slots held, see :meth:`_reserve_destinations`;
        when one has nowhere to go the best place without migration is taken instead;
        ``preempt`` mode: they are unloaded), and create the instance. Runs without an await.
        ``send`` false leaves the load unsent (the caller sends it with :meth:`_send`);
        ``changes`` is the notification count before the caller's awaits (None: a migration's
        destination, whose "no room" is not remembered).

        Raises:
            Unavailable: no invoker could ever hold the instance.
            ModelNotFound: the model left the store root.
        """
        t0 = time.perf_counter()
        decision = self.decide(manifest, invokers, may_migrate=may_migrate)
        moves: dict[str, LiveInstance] = {}
        while True:
            if decision is None:
                log.info("no room for %s on any invoker: waiting for an instance to free up",
                         manifest.name)
                # (no room without migration says nothing of the room with it)
                if changes is not None and may_migrate:
                    self._no_room[manifest.name] = (changes, time.monotonic())
                return None
            if unless_wait is not None and max(unless_wait, waited_s) < decision.chosen.total_s:
                log.info("waiting for a busy instance of %s (expected in %.3f s, waited %.3f s) "
                         "instead of a cold start on %s", manifest.name, unless_wait, waited_s,
                         decision.chosen.brief())
                self._no_room.pop(manifest.name, None)  # it waits by choice, not for room
                return None
            if not decision.migrate or self.mode != "live":
                break
            reserved = self._reserve_destinations(decision.migrate, invokers, manifest.name)
            if reserved is not None:
                moves = reserved
                break
            log.info("an instance on %s has nowhere to migrate to: placing %s without migration",
                     decision.invoker.id, manifest.name)
            decision = self.decide(manifest, invokers, may_migrate=False)
        decision_s = time.perf_counter() - t0
        self._no_room.pop(manifest.name, None)
        for iid in decision.evict:  # retired before any await: no invocation can take them now
            self._retire_and_unload(iid, f"evicted (least recently used idle) for {manifest.name}",
                                    if_idle=True)
        if self.mode == "preempt":
            for iid in decision.migrate:
                self._retire_and_unload(iid, f"preempted: making room for {manifest.name}")
        now = self._clock()
        inv = decision.invoker
        record = InstanceRecord(
            id=f"{manifest.name}-{uuid.uuid4().hex[:8]}", function=manifest.name,
            model=manifest.spec.model, invoker_id=inv.id, invoker_url=inv.url,
            state=S.PENDING, created=now, memory_bytes=manifest.spec.resources.memory,
            placement=placement_record(decision, list(decision.evict), now, decision_s),
            ready_by=now + decision.chosen.total_s,
        )
        live = LiveInstance(record, in_flight=int(reserve), max_tokens=manifest.spec.generation.maxTokens,
                            device=manifest.spec.resources.device)
        self.instances[record.id] = live
        log.info("cold start: instance %s of %s on %s; %d candidates, decided in %.2f ms; "
                 "next best: %s", record.id, manifest.name, decision.chosen.brief(),
                 decision.considered, decision_s * 1e3,
                 "; ".join(e.brief() for e in decision.candidates[:4]
                           if e.invoker_id != inv.id)[:400] or "none")
        reason = f"making room for {manifest.name}"
        for iid, dest in moves.items():
            mover = self.instances[iid]
            if dest.state == S.PENDING:  # started for it, not an idle one
                self._send(dest)
            move = asyncio.ensure_future(self._move(mover, dest, mover.in_flight, reason=reason))
            self._tasks.add(move)  # cancelled when the pool closes
            move.add_done_callback(self._tasks.discard)
            live.after.append(move)
        if send:
            self._send(live)
        return live

    def _send(self, live: LiveInstance) -> None:
        """Record a new instance in etcd, then send its load, in the background."""
        self._spawn(self._record_and_load(live))

    async def _record_and_load(self, live: LiveInstance) -> None:
        record = live.record
        if live.state in STARTING:
            try:  # durable before the load is sent: a successor controller finds the pending load
                await self._etcd.put(keys.Kind.INSTANCE, record.id, record)
            except Unavailable as e:
                log.warning("instance %s not recorded before its load (%s); the flusher retries",
                            record.id, e.message)
                self._mark(record.id)
            if live.record is not record:  # changed during the write: the flusher writes it now
                self._mark(record.id)
        await self._load(live)

    def _sources(self, model: str, exclude: str) -> list[str]:
        """URLs of live invokers holding ``model``'s checkpoint, DRAM tier first."""
        return holder_urls(self.tiers.get(model, {}), self._urls, exclude)

    async def _load(self, live: LiveInstance) -> None:
        rec = live.record
        if live.after:  # running instances migrate away first
            results = await asyncio.gather(*live.after, return_exceptions=True)
            failures = [why for why in map(_migration_failure, results) if why is not None]
            if failures and live.state in STARTING:
                self._no_migration_until = time.monotonic() + MIGRATION_BACKOFF_S
                why_s = failures[0]
                # no error: a waiting acquire places again (migration is left out a while)
                self._retire(rec.id, f"room could not be made by migration: {why_s}")
                live.loaded.set()
                await self._notify()
                return
        if live.state not in STARTING:  # stopped or lost before its load was sent
            if live.state != S.LOST and live.error is None:
                live.error = Unavailable(f"instance {rec.id} was stopped before it loaded",
                                         retry_after=1)
            live.loaded.set()
            await self._notify()
            return
        if live.state == S.PENDING:
            self._set_state(live, S.LOADING)
        req = LoadRequest(instance_id=rec.id, function=rec.function, model=rec.model,
                          device=live.device, sources=self._sources(rec.model, rec.invoker_id))
        try:
            resp = await self._invokers.load(rec.invoker_url, req)
        except SllmError as e:
            if live.state not in FINAL:
                log.warning("instance %s failed to load: %s", rec.id, e.message)
                live.error = e
                self._set_state(live, S.STOPPED, reason=f"load failed: {e.message}")
                self.instances.pop(rec.id, None)
        else:
            if live.state in FINAL or live.state == S.DRAINING:  # stopped while loading: undo it
                live.error = Unavailable(f"instance {rec.id} was stopped while loading", retry_after=1)
                if live.state == S.DRAINING:
                    await self.stop(rec.id, reason=live.record.reason or "stopped while loading")
                elif live.state == S.STOPPED:
                    await self._unload(live)
            else:
                now = self._clock()
                live.nbytes = resp.nbytes
                self._set_state(live, S.IDLE, loaded_at=now, last_used=now, ready_by=None,
                                load_seconds=resp.load_seconds, read_seconds=resp.read_seconds,
                                tier=resp.tier, transfer_seconds=resp.transfer_seconds or None,
                                fetched_from=resp.source)
                self.note_copy(rec.model, rec.invoker_id)
        live.loaded.set()
        await self._notify()

    def note_copy(self, model: str, invoker_id: str) -> None:
        """Record that ``invoker_id`` now holds a copy of ``model``'s checkpoint (on SSD at
        least; a tier already known is kept), before its invoker's next checkpoint report."""
        self.tiers.setdefault(model, {}).setdefault(invoker_id, "ssd")

    async def refresh_tiers(self) -> None:
        """Re-read where every checkpoint is (``/sllm/checkpoints/``, published by invokers).

        Raises:
            Unavailable: etcd is away.
        """
        tiers: dict[str, dict[str, Tier]] = {}
        for r in await self._etcd.list(keys.Kind.CHECKPOINT, CheckpointRecord):
            tiers.setdefault(r.model, {})[r.invoker_id] = r.tier
        self.tiers.clear()
        self.tiers.update(tiers)

    # --- migration ------------------------------------------------------------------------------

    def _reserve_destinations(self, ids: Iterable[str], invokers: list[InvokerRecord],
                              function: str) -> dict[str, LiveInstance] | None:
        """Destinations for the running instances ``ids``, which move away to make room for a
        new instance of ``function``, taken now (:meth:`_destination_now`): each mover is marked
        migrating and its destination holds a slot per invocation in flight, so no other
        placement or invocation takes either. Returns mover id -> destination, or None when one
        has nowhere to go (what was reserved for the others is given back; a destination whose
        placement unloaded idle instances leaves them unloaded)."""
        moves: dict[str, LiveInstance] = {}
        for iid in ids:
            mover = self.instances.get(iid)
            manifest = self._manifests.get(mover.record.function) if mover is not None else None
            dest = None
            if mover is not None and manifest is not None and mover.state in LOADED:
                try:
                    dest = self._destination_now(mover, manifest, invokers, only=None,
                                                 reason=f"making room for {function}")
                except SllmError as e:
                    log.info("no destination for %s: %s", iid, e.message)
            if dest is None:
                for moved, d in moves.items():
                    self._give_back(self.instances[moved], d)
                return None
            moves[iid] = dest
        return moves

    def _destination_now(self, mover: LiveInstance, manifest: FunctionManifest,
                         invokers: list[InvokerRecord], *, only: str | None, reason: str
                         ) -> LiveInstance | None:
        """Reserve a migration destination for the loaded instance ``mover``, without an await:
        an idle instance of its function on another invoker (``only``: that one), else a new
        one placed among the other ``invokers`` without moving anything (its load unsent: the
        caller sends it). The mover is marked migrating (no invocation takes it meanwhile) and
        the destination holds one slot per invocation in flight on the mover. Returns None
        when no invoker has room.

        Raises:
            Unavailable: no invoker could ever hold it.
            ModelNotFound: its model left the store root.
        """
        dest = self._idle_destination(mover, only)
        if dest is None:
            others = [i for i in invokers if i.id != mover.record.invoker_id
                      and (only is None or i.id == only)]
            if not others:
                raise Unavailable("no other invoker is running", retry_after=5)
            dest = self._place_now(manifest, others, reserve=False, may_migrate=False, send=False)
            if dest is None:
                return None
        self._set_state(mover, S.MIGRATING, reason=reason)
        self._hold(dest, mover.in_flight)
        return dest

    def _give_back(self, mover: LiveInstance, dest: LiveInstance) -> None:
        """Undo :meth:`_destination_now` for a migration that will not happen."""
        self._unhold(dest, mover.in_flight)
        if dest.state == S.PENDING and dest.in_flight == 0:
            self.instances.pop(dest.record.id, None)  # never sent nor recorded: forgotten
        if mover.state == S.MIGRATING:
            self._set_state(mover, S.ACTIVE if mover.in_flight else S.IDLE, reason=None)

    def _idle_destination(self, source: LiveInstance, only: str | None) -> LiveInstance | None:
        """An idle instance of the source's function on another invoker (``only``: that one)."""
        for live in self.instances.values():
            rec = live.record
            if (rec.function == source.record.function and rec.model == source.record.model
                    and live.state == S.IDLE and live.in_flight == 0
                    and rec.invoker_id != source.record.invoker_id
                    and (only is None or rec.invoker_id == only)):
                return live
        return None

    def _loaded(self, instance_id: str, to: str | None) -> LiveInstance:
        """The loaded instance ``instance_id``, as :meth:`migrate` may move it (its errors)."""
        live = self.instances.get(instance_id)
        if live is None:
            raise InstanceNotFound(f"no instance {instance_id!r}")
        if live.state not in LOADED:
            raise Conflict(f"instance {instance_id} is {live.state.value}; only an idle or active "
                           "instance can migrate")
        if to is not None and to == live.record.invoker_id:
            raise Conflict(f"instance {instance_id} is on invoker {to} already")
        return live

    async def migrate(self, instance_id: str, *, to: str | None = None, reason: str
                      ) -> tuple[MigrateResponse, InstanceRecord]:
        """Live-migrate a loaded instance (ServerlessLLM §5), as an operator asks: find or start
        an instance of its function on another invoker (``to``: that one) and move every
        generation there by its tokens (:meth:`_move`).

        Returns:
            What the source's invoker reported (generations moved, finished first, rounds,
            tokens recomputed, seconds), and the destination's record.

        Raises:
            InstanceNotFound: no such instance.
            Conflict: it is not loaded (starting, migrating or draining already), or ``to`` is
                its own invoker.
            Unavailable: no invoker has room for the destination (or none runs).
            MigrationFailed: the destination failed to load or to take the generations.
        """
        live = self._loaded(instance_id, to)
        if self._manifest_of is None:
            raise Unavailable("this controller cannot migrate instances")
        manifest = await self._manifest_of(live.record.function)
        invokers = await self._list_invokers()
        live = self._loaded(instance_id, to)  # again, after the awaits
        dest = self._destination_now(live, manifest, invokers, only=to, reason=reason)
        if dest is None:
            raise Unavailable(f"no invoker has room for a destination of {instance_id}",
                              retry_after=5)
        if dest.state == S.PENDING:  # started for it, not an idle one
            self._send(dest)
        return await self._move(live, dest, live.in_flight, reason=reason)

    async def _move(self, live: LiveInstance, dest: LiveInstance, reserved: int, *, reason: str
                    ) -> tuple[MigrateResponse, InstanceRecord]:
        """Move the generations of the migrating ``live`` to ``dest``, which holds ``reserved``
        slots for them (:meth:`_destination_now`): wait for ``dest`` to load, then have the
        source's invoker move every generation there by its tokens (:mod:`invoker.migration`).
        The gateways follow each stream and move their slots (:meth:`release` with
        ``moved_to``). Afterwards the source drains (it stops once the last slot moved); when
        the migration is abandoned it goes on serving. Returns and raises as :meth:`migrate`.
        """
        source = live.record
        try:
            await dest.loaded.wait()
            if dest.error is not None or dest.state not in LOADED:
                why = dest.error.message if dest.error else f"it is {dest.state.value}"
                raise MigrationFailed(f"the destination {dest.record.id} did not load: {why}")
            log.info("migrating %s (%d in flight) from %s to %s on %s: %s", source.id, reserved,
                     source.invoker_id, dest.record.id, dest.record.invoker_id, reason)
            resp = await self._invokers.migrate(
                source.invoker_url, source.id,
                MigrateRequest(to_url=dest.record.invoker_url, to_instance=dest.record.id))
        except BaseException as e:
            self._unhold(dest, reserved)
            if live.state == S.MIGRATING:
                self._set_state(live, S.ACTIVE if live.in_flight else S.IDLE, reason=None)
            await self._notify()
            if isinstance(e, SllmError):
                log.warning("migration of %s abandoned: %s", source.id, e.message)
            raise
        self._unhold(dest, reserved - resp.moved)  # the moved ones' gateways claim theirs
        if live.state == S.MIGRATING:
            if resp.abandoned is not None:
                self._set_state(live, S.ACTIVE if live.in_flight else S.IDLE, reason=None)
            else:
                live.record = live.record.model_copy(update={"migrated_to": dest.record.id})
                await self.drain(source.id, reason=f"migrated to {dest.record.id} "
                                 f"on {dest.record.invoker_id}: {reason}")
        await self._notify()
        return resp, dest.record

    def _hold(self, live: LiveInstance, slots: int) -> None:
        """Reserve ``slots`` invocation slots on a migration's destination."""
        live.in_flight += slots
        live.reserved += slots
        if slots and live.state == S.IDLE:
            self._set_state(live, S.ACTIVE)

    def _unhold(self, live: LiveInstance, slots: int) -> None:
        """Give back up to ``slots`` reserved slots that no generation will claim."""
        drop = min(live.reserved, max(0, slots))
        live.reserved -= drop
        live.in_flight = max(0, live.in_flight - drop)
        if live.in_flight == 0 and live.state == S.ACTIVE:
            self._set_state(live, S.IDLE, last_used=self._clock())

    def _claim(self, instance_id: str) -> None:
        """A gateway's generation arrived on ``instance_id`` by migration: it takes a slot
        reserved for it, or a new one when none is left (it followed a migration after the
        migration's reservations were given back)."""
        live = self.instances.get(instance_id)
        if live is None:
            log.warning("a generation moved to %s, which is gone", instance_id)
            return
        if live.reserved > 0:
            live.reserved -= 1
        else:
            self._take(live)

    # --- stopping -------------------------------------------------------------------------------

    def _retire(self, instance_id: str, reason: str, *, if_idle: bool = False
                ) -> tuple[LiveInstance, bool] | None:
        """Forget an instance and mark it stopped, at once (no await): returns it and whether it
        was still starting, or None when it is unknown (or, with ``if_idle``, no longer idle)."""
        live = self.instances.get(instance_id)
        if live is None or (if_idle and (live.state != S.IDLE or live.in_flight)):
            return None
        del self.instances[instance_id]
        self._stopped[instance_id] = None
        while len(self._stopped) > RECENTLY_STOPPED:
            del self._stopped[next(iter(self._stopped))]
        starting = live.state in STARTING
        self._set_state(live, S.STOPPED, reason=reason)
        log.info("instance %s stopped: %s", instance_id, reason)
        return live, starting

    def _retire_and_unload(self, instance_id: str, reason: str, *, if_idle: bool = False) -> None:
        """:meth:`_retire` at once, then have the invoker unload the instance in the
        background (for a loaded instance taken away mid-decision: evicted or preempted)."""
        retired = self._retire(instance_id, reason, if_idle=if_idle)
        if retired is not None:
            self._spawn(self._unload(retired[0]))

    async def stop(self, instance_id: str, *, reason: str, unload: bool = True,
                   if_idle: bool = False) -> None:
        """Stop an instance: forget it, delete its record, and (``unload``) have its invoker
        unload it. With ``if_idle`` only an instance still idle with nothing in flight is
        stopped (a decision taken earlier may be stale by now). Unload failures are logged: the
        invoker may be gone."""
        retired = self._retire(instance_id, reason, if_idle=if_idle)
        if retired is None:
            return
        live, starting = retired
        if unload and not starting:  # a load in flight is undone when it answers (see _load)
            await self._unload(live)
        await self._notify()

    async def drain(self, instance_id: str, *, reason: str) -> None:
        """Stop an instance once its invocations in flight end (now, when it has none)."""
        live = self.instances.get(instance_id)
        if live is None or live.state in FINAL:
            return
        if live.state == S.PENDING or (live.in_flight == 0 and live.state != S.LOADING):
            await self.stop(instance_id, reason=reason)
        elif live.state != S.DRAINING:
            self._set_state(live, S.DRAINING, reason=reason)

    async def _unload(self, live: LiveInstance) -> None:
        try:
            await self._invokers.unload(live.record.invoker_url, live.record.id)
        except SllmError as e:
            log.warning("unloading %s failed: %s", live.record.id, e.message)

    def lose_invoker(self, invoker_id: str, reason: str) -> list[str]:
        """Mark every instance on a dead invoker lost (waiters on its loads place again).
        Returns their ids."""
        now = self._clock()
        gone = [i for i in self.instances.values() if i.record.invoker_id == invoker_id]
        for live in gone:
            self.instances.pop(live.record.id, None)
            self._set_state(live, S.LOST, reason=reason, lost_at=now)
            self.lost[live.record.id] = live.record
            live.loaded.set()
            log.warning("instance %s lost: %s", live.record.id, reason)
        for by_inv in self.tiers.values():
            by_inv.pop(invoker_id, None)
        if gone:  # calls that joined their loads place again
            self._spawn(self._notify())
        return [live.record.id for live in gone]

    def expire_lost(self) -> None:
        """Delete lost records older than :data:`~sllm.config.LOST_RETENTION_S`."""
        now = self._clock()
        for iid, rec in list(self.lost.items()):
            if now - (rec.lost_at or now) >= LOST_RETENTION_S:
                del self.lost[iid]
                self._mark(iid)

    # --- recovery -------------------------------------------------------------------------------

    async def adopt(
        self, records: Iterable[InstanceRecord], reported: Mapping[str, set[str]],
        max_tokens: Mapping[str, int],
    ) -> list[tuple[str, str, str]]:
        """Rebuild the pool after a controller (re)start from etcd's records.

        - loaded instances their invoker still reports: adopted as idle (draining ones are
          stopped);
        - pending and loading instances on a live invoker: their load is sent again (an invoker
          joins a load of the same instance already in progress);
        - instances on an invoker that is gone: lost;
        - lost records: kept until their retention ends; everything else: deleted.

        Args:
            records: instance records from etcd.
            reported: live invoker id -> ids of the instances it has loaded.
            max_tokens: function name -> its maxTokens (for migration estimates).

        Returns:
            Orphans, ``(invoker id, instance id, why)``: instances an invoker has that no record
            names; the caller unloads them.
        """
        known: set[str] = set()
        for rec in records:
            known.add(rec.id)
            if rec.state == S.LOST:
                self.lost[rec.id] = rec
                continue
            if rec.state in FINAL:
                self._mark(rec.id)
                continue
            live = LiveInstance(rec, max_tokens=max_tokens.get(rec.function, 0))
            if rec.invoker_id not in reported:
                self.instances[rec.id] = live
                self.lose_invoker(rec.invoker_id, f"invoker {rec.invoker_id} gone while no "
                                  "controller led")
            elif rec.state in STARTING:
                self.instances[rec.id] = live
                log.info("resending the pending load of %s", rec.id)
                self._spawn(self._load(live))
            elif rec.id in reported[rec.invoker_id]:
                live.loaded.set()
                self.instances[rec.id] = live
                if rec.state == S.DRAINING:
                    self._spawn(self.stop(rec.id, reason=rec.reason or "drained"))
                    continue
                # invocations in flight are the gateway's; it releases them to us
                self._set_state(live, S.IDLE if rec.state == S.ACTIVE else rec.state)
                log.info("adopted instance %s of %s", rec.id, rec.function)
            else:
                log.info("instance %s is no longer on %s; forgetting it", rec.id, rec.invoker_id)
                self._mark(rec.id)
        orphans = [(inv, iid, "no instance record names it")
                   for inv, ids in reported.items() for iid in sorted(ids - known)]
        self._flush_wakeup.set()
        return orphans

    def views(self) -> list[InstanceView]:
        """The autoscaler's view of every instance."""
        return [
            InstanceView(id=i.record.id, function=i.record.function, model=i.record.model,
                         state=i.state, last_used=i.record.last_used or i.record.created)
            for i in self.instances.values()
        ]

    def records(self) -> list[InstanceRecord]:
        """Every instance's record, lost ones included."""
        return [i.record for i in self.instances.values()] + list(self.lost.values())

    async def close(self) -> None:
        """Stop: cancel background work and send every waiting acquire away with NotLeader
        (the pool is dropped when its controller stops leading; nothing is unloaded)."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for live in self.instances.values():
            if not live.loaded.is_set():
                live.error = NotLeader("this controller stopped leading", retry_after=1)
                live.loaded.set()
        await self._notify()


def _with_free_slot(instances: Iterable[LiveInstance], target: int) -> list[LiveInstance]:
    """The loaded ones among ``instances`` with fewer than ``target`` (the function's
    ``targetConcurrency``) invocations in flight."""
    return [i for i in instances if i.state in LOADED and i.in_flight < target]


def placement_record(p: Placement, evicted: list[str], now: float, seconds: float) -> PlacementRecord:
    """The durable form of a placement decision (``seconds``: how long deciding took)."""
    def est(e: Estimate) -> EstimateRecord:
        return EstimateRecord(invoker_id=e.invoker_id, tier=e.tier, queue_seconds=e.queue_s,
                              load_seconds=e.load_s, migration_seconds=e.migration_s,
                              total_seconds=e.total_s, evicts=e.evicts, migrates=e.migrates)

    return PlacementRecord(policy=p.policy, chosen=est(p.chosen),
                           candidates=[est(c) for c in p.candidates], considered=p.considered,
                           evicted=evicted, migrate=list(p.migrate), decided_at=now,
                           decision_seconds=seconds)


def _migration_failure(result: tuple[MigrateResponse, InstanceRecord] | BaseException
                       ) -> str | None:
    """Why a migration made to free room failed (its error, or why it was abandoned), or None
    when it succeeded."""
    if isinstance(result, SllmError):
        return result.message
    if isinstance(result, BaseException):
        return repr(result)
    return result[0].abandoned or None
