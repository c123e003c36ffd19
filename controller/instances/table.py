"""The instance table: the leader's working memory of instances, their states and slots.

etcd holds the durable copy (one :class:`~sllm.messages.InstanceRecord` per instance). A new
instance's record is written before its load is sent (:mod:`controller.instances.lifecycle`);
later changes are marked here and written by a background flusher (:meth:`InstanceTable.flush`),
so the hot path of a warm invocation does no etcd round trip and keeps working while etcd is
briefly away.

Besides the instances the table keeps what the layers above share about the cluster: where each
checkpoint is (``tiers``), the live invokers' URLs as of the last decision (``urls``), and the
last manifest seen per function (``manifests``). Every change that may let a waiting call go on
is announced with :meth:`InstanceTable.notify`; waiters wait with
:meth:`InstanceTable.wait_for_change`.

Nothing here awaits an invoker: the layers above carry out loads, unloads and migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from controller.autoscaler import InstanceView
from sllm import keys
from sllm.config import LOST_RETENTION_S
from sllm.errors import NotLeader, SllmError, Unavailable
from sllm.manifest import FunctionManifest, Scheduling
from sllm.messages import CheckpointRecord, InstanceRecord, MigrateResponse
from sllm.states import FINAL, LOADED, STARTING, InstanceState, check_transition
from sllm.tiers import Tier

log = logging.getLogger(__name__)

S = InstanceState
T = TypeVar("T")

RECENTLY_STOPPED = 1024
"""Ids of stopped instances remembered, so that a late release of one is not an error."""


class RecordStore(Protocol):
    """What the table needs of etcd (:class:`sllm.etcd.Etcd`): writing and deleting records,
    listing checkpoint records."""

    async def put(self, kind: keys.Kind, name: str, record: InstanceRecord) -> None: ...

    async def delete(self, kind: keys.Kind, name: str) -> bool: ...

    async def list(self, kind: keys.Kind, model: type[CheckpointRecord]
                   ) -> list[CheckpointRecord]: ...


@dataclass
class LiveInstance:
    """One instance as the controller tracks it in memory (its durable form is ``record``)."""

    record: InstanceRecord
    in_flight: int = 0  # invocations holding a slot (including those waiting for the load)
    reserved: int = 0  # of which slots held for generations migrating here, not yet claimed
    max_tokens: int = 0  # the function's maxTokens: the migration estimate's bound per inference
    nbytes: int = 0  # its checkpoint's bytes (from its load's answer; 0 until known)
    device: str = "auto"  # the function's spec.resources.device, which its load asks for
    scheduling: Scheduling = field(default_factory=Scheduling)  # its spec.scheduling, for the load
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    taken: deque[float] = field(default_factory=deque)  # unix seconds each slot was taken
    error: SllmError | None = None  # why the load failed, once ``loaded`` is set
    # migrations that make room for it: its load is sent once they are done
    after: list[asyncio.Task[tuple[MigrateResponse, InstanceRecord]]] = field(
        default_factory=list)

    @property
    def state(self) -> InstanceState:
        return self.record.state


def with_free_slot(instances: Iterable[LiveInstance], target: int) -> list[LiveInstance]:
    """The loaded ones among ``instances`` with fewer than ``target`` (the function's
    ``targetConcurrency``) invocations in flight."""
    return [i for i in instances if i.state in LOADED and i.in_flight < target]


class InstanceTable:
    """Instances by id, their state changes and slot accounting. All methods run on one event
    loop; none awaits an invoker.

    Args:
        etcd: where records are written (None: never flushed, for decisions in memory).
        clock: unix seconds; a parameter so tests can drive time.
    """

    def __init__(self, etcd: RecordStore | None, clock: Callable[[], float]) -> None:
        self._etcd = etcd
        self.clock = clock
        self.instances: dict[str, LiveInstance] = {}
        self.lost: dict[str, InstanceRecord] = {}  # final records kept for LOST_RETENTION_S
        self.stopped: dict[str, None] = {}  # recently stopped ids, oldest first
        self.tiers: dict[str, dict[str, Tier]] = {}  # model -> invoker id -> tier
        self.urls: dict[str, str] = {}  # live invoker id -> URL, as of the last decision
        self.manifests: dict[str, FunctionManifest] = {}  # the last seen, per function
        self.changes = 0  # counts notifications: "has anything changed since?"
        self.closed = False
        self._changed = asyncio.Condition()
        self._dirty: set[str] = set()
        self._flush_wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- state and records ----------------------------------------------------------------------

    def set_state(self, live: LiveInstance, new: InstanceState, **changes: object) -> None:
        """Move ``live`` to ``new`` (raises InternalError for an illegal transition) with other
        record fields ``changes``, and mark its record to be written."""
        check_transition(live.record.state, new)
        if new != live.record.state:
            log.info("instance %s (%s): %s -> %s", live.record.id, live.record.function,
                     live.record.state.value, new.value)
        live.record = live.record.model_copy(update={"state": new, **changes})
        self.mark(live.record.id)

    def mark(self, instance_id: str) -> None:
        """Have the flusher write (or delete) this instance's record soon."""
        self._dirty.add(instance_id)
        self._flush_wakeup.set()

    async def write_now(self, live: LiveInstance) -> None:
        """Write ``live``'s record at once (a new instance's, before its load is sent, so that a
        successor controller finds the pending load); when etcd is away, the flusher retries."""
        record = live.record
        if self._etcd is not None:
            try:
                await self._etcd.put(keys.Kind.INSTANCE, record.id, record)
            except Unavailable as e:
                log.warning("instance %s not recorded before its load (%s); the flusher retries",
                            record.id, e.message)
                self.mark(record.id)
        if live.record is not record:  # changed during the write: the flusher writes it now
            self.mark(record.id)

    async def flush(self) -> None:
        """Write every changed instance record to etcd now (stopped ones are deleted, lost ones
        kept until their retention ends).

        Raises:
            Unavailable: etcd is away (what is not written yet stays to write).
        """
        if self._etcd is None:
            return
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

    def wake_flusher(self) -> None:
        self._flush_wakeup.set()

    # --- changes and background work ------------------------------------------------------------

    async def notify(self) -> None:
        """Announce a change (a release, a state change, the end of a load): every waiter looks
        again."""
        self.changes += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Wait until :meth:`notify` is called or ``timeout_s`` seconds pass."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` in the background; it is cancelled by :meth:`close`."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop: cancel background work and fail every load still awaited with NotLeader (the
        table is dropped when its controller stops leading; nothing is unloaded)."""
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        for live in self.instances.values():
            if not live.loaded.is_set():
                live.error = NotLeader("this controller stopped leading", retry_after=1)
                live.loaded.set()
        await self.notify()

    # --- queries --------------------------------------------------------------------------------

    def candidates(self, manifest: FunctionManifest) -> list[LiveInstance]:
        """The function's instances that serve or will: loaded or starting, of its model."""
        return [
            i for i in self.instances.values()
            if i.record.function == manifest.name and i.record.model == manifest.spec.model
            and (i.state in LOADED or i.state in STARTING)
        ]

    def used_bytes(self) -> dict[str, int]:
        """Invoker id -> instance memory reserved on it (bytes)."""
        used: dict[str, int] = {}
        for i in self.instances.values():
            if i.state not in FINAL:
                used[i.record.invoker_id] = used.get(i.record.invoker_id, 0) + i.record.memory_bytes
        return used

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

    # --- slots ----------------------------------------------------------------------------------

    def take(self, live: LiveInstance) -> None:
        """An invocation takes a slot on ``live``."""
        live.in_flight += 1
        live.taken.append(self.clock())
        if live.state == S.IDLE:
            self.set_state(live, S.ACTIVE)

    def hold(self, live: LiveInstance, slots: int) -> None:
        """Reserve ``slots`` invocation slots on a migration's destination."""
        live.in_flight += slots
        live.reserved += slots
        if slots and live.state == S.IDLE:
            self.set_state(live, S.ACTIVE)

    def unhold(self, live: LiveInstance, slots: int) -> None:
        """Give back up to ``slots`` reserved slots that no generation will claim."""
        drop = min(live.reserved, max(0, slots))
        live.reserved -= drop
        live.in_flight = max(0, live.in_flight - drop)
        if live.in_flight == 0 and live.state == S.ACTIVE:
            self.set_state(live, S.IDLE, last_used=self.clock())

    def claim(self, instance_id: str) -> None:
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
            self.take(live)

    # --- leaving the table ----------------------------------------------------------------------

    def retire(self, instance_id: str, reason: str, *, if_idle: bool = False
               ) -> tuple[LiveInstance, bool] | None:
        """Forget an instance and mark it stopped, at once (no await): returns it and whether it
        was still starting, or None when it is unknown (or, with ``if_idle``, no longer idle).
        Unloading it is the caller's (:mod:`controller.instances.lifecycle`)."""
        live = self.instances.get(instance_id)
        if live is None or (if_idle and (live.state != S.IDLE or live.in_flight)):
            return None
        del self.instances[instance_id]
        self.stopped[instance_id] = None
        while len(self.stopped) > RECENTLY_STOPPED:
            del self.stopped[next(iter(self.stopped))]
        starting = live.state in STARTING
        self.set_state(live, S.STOPPED, reason=reason)
        log.info("instance %s stopped: %s", instance_id, reason)
        return live, starting

    def lose_invoker(self, invoker_id: str, reason: str) -> list[str]:
        """Mark every instance on a dead invoker lost (waiters on its loads place again) and
        forget the checkpoints it held. Returns the instances' ids."""
        now = self.clock()
        gone = [i for i in self.instances.values() if i.record.invoker_id == invoker_id]
        for live in gone:
            self.instances.pop(live.record.id, None)
            self.set_state(live, S.LOST, reason=reason, lost_at=now)
            self.lost[live.record.id] = live.record
            live.loaded.set()
            log.warning("instance %s lost: %s", live.record.id, reason)
        for by_inv in self.tiers.values():
            by_inv.pop(invoker_id, None)
        if gone:  # calls that joined their loads place again
            self.spawn(self.notify())
        return [live.record.id for live in gone]

    def expire_lost(self) -> None:
        """Delete lost records older than :data:`~sllm.config.LOST_RETENTION_S`."""
        now = self.clock()
        for iid, rec in list(self.lost.items()):
            if now - (rec.lost_at or now) >= LOST_RETENTION_S:
                del self.lost[iid]
                self.mark(iid)

    # --- checkpoints ----------------------------------------------------------------------------

    def note_copy(self, model: str, invoker_id: str) -> None:
        """Record that ``invoker_id`` now holds a copy of ``model``'s checkpoint (on SSD at
        least; a tier already known is kept), before its invoker's next checkpoint report."""
        self.tiers.setdefault(model, {}).setdefault(invoker_id, "ssd")

    async def refresh_tiers(self) -> None:
        """Re-read where every checkpoint is (``/sllm/checkpoints/``, published by invokers).

        Raises:
            Unavailable: etcd is away.
        """
        if self._etcd is None:
            return
        tiers: dict[str, dict[str, Tier]] = {}
        for r in await self._etcd.list(keys.Kind.CHECKPOINT, CheckpointRecord):
            tiers.setdefault(r.model, {})[r.invoker_id] = r.tier
        self.tiers.clear()
        self.tiers.update(tiers)
