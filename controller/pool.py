"""The instance pool: which instances exist, where, in what state, and how busy.

The pool is the controller's working memory of instances; etcd holds the durable copy (one
:class:`~sllm.messages.InstanceRecord` per instance, written by a background flusher so the hot
path of a warm invocation does no etcd round trip).

How an invocation gets an instance (:meth:`InstancePool.acquire`):

1. a loaded instance of the function with fewer than ``targetConcurrency`` invocations in flight
   (the least busy) -> a warm start;
2. else an instance of it that is still loading and has a free slot -> join that cold start;
3. else, below ``maxInstances``, place a new instance (:mod:`controller.placement`), unloading the
   least recently used idle instance of another function when no invoker has room -> a cold start;
4. else wait, in a bounded queue (429 past :data:`~sllm.config.MAX_QUEUE_PER_FUNCTION` waiters),
   until an instance frees up, at most until the deadline (then 503 with Retry-After), as
   Knative's activator buffers requests while a revision scales from zero.

Every acquired slot is given back with :meth:`InstancePool.release`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from controller.autoscaler import InstanceView
from controller.invoker_client import InvokerClient
from controller.placement import choose_invoker
from sllm import keys
from sllm.config import MAX_QUEUE_PER_FUNCTION
from sllm.errors import InstanceNotFound, SllmError, TooManyRequests, Unavailable
from sllm.etcd import Etcd
from sllm.manifest import FunctionManifest
from sllm.messages import Assignment, InstanceRecord, InvokerRecord, LoadRequest
from sllm.states import LOADED, InstanceState, check_transition

log = logging.getLogger(__name__)


@dataclass
class LiveInstance:
    """One instance as the controller tracks it in memory."""

    record: InstanceRecord
    in_flight: int = 0  # invocations holding a slot (including those waiting for the load)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    error: SllmError | None = None  # why the load failed, once ``loaded`` is set

    @property
    def state(self) -> InstanceState:
        return self.record.state


class InstancePool:
    """Tracks instances and hands out invocation slots. All methods run on one event loop.

    Args:
        etcd: the durable store.
        invokers: HTTP client for invokers.
        list_invokers: returns the live invokers (from etcd).
        clock: unix seconds; a parameter so tests can drive time.
    """

    def __init__(
        self,
        etcd: Etcd,
        invokers: InvokerClient,
        list_invokers: Callable[[], Awaitable[list[InvokerRecord]]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._etcd = etcd
        self._invokers = invokers
        self._list_invokers = list_invokers
        self._clock = clock
        self.instances: dict[str, LiveInstance] = {}
        self._changed = asyncio.Condition()
        self._waiting: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._flush_wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- state changes --------------------------------------------------------------------------

    def _set_state(self, live: LiveInstance, new: InstanceState, **changes: object) -> None:
        check_transition(live.record.state, new)
        if new != live.record.state:
            log.info("instance %s (%s): %s -> %s", live.record.id, live.record.function,
                     live.record.state.value, new.value)
        live.record = live.record.model_copy(update={"state": new, **changes})
        self._dirty.add(live.record.id)
        self._flush_wakeup.set()

    async def flush(self) -> None:
        """Write every changed instance record to etcd now (stopped ones are deleted)."""
        while self._dirty:
            iid = self._dirty.pop()
            live = self.instances.get(iid)
            try:
                if live is None:
                    await self._etcd.delete(keys.Kind.INSTANCE, iid)
                else:
                    await self._etcd.put(keys.Kind.INSTANCE, iid, live.record)
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
        async with self._changed:
            self._changed.notify_all()

    # --- acquire / release ----------------------------------------------------------------------

    def _candidates(self, manifest: FunctionManifest) -> list[LiveInstance]:
        return [
            i for i in self.instances.values()
            if i.record.function == manifest.name and i.record.model == manifest.spec.model
            and i.state != InstanceState.STOPPED
        ]

    async def acquire(self, manifest: FunctionManifest, deadline_s: float) -> Assignment:
        """A slot on an instance of the function, starting one if needed (see module docstring).

        Args:
            manifest: the function's manifest.
            deadline_s: seconds this call may wait for capacity and loading together.

        Raises:
            TooManyRequests: the function's wait queue is full.
            Unavailable: no instance could be had before the deadline, or no invoker can host it.
            SllmError: the load failed (ModelNotFound, CheckpointError, InvokerError).
        """
        start = time.monotonic()
        deadline = start + deadline_s
        target = manifest.spec.scaling.targetConcurrency
        queue_s = 0.0
        queued = False
        try:
            while True:
                cands = self._candidates(manifest)
                loaded = [i for i in cands if i.state in LOADED and i.in_flight < target]
                if loaded:
                    live = min(loaded, key=lambda i: i.in_flight)
                    self._take(live)
                    return self._assignment(manifest, live, cold=False, queue_s=queue_s, load_s=0.0)
                loading = [i for i in cands if i.state not in LOADED and i.in_flight < target]
                if not loading and len(cands) < manifest.spec.scaling.maxInstances:
                    loading = [await self.start_instance(manifest)]
                if loading:
                    live = min(loading, key=lambda i: i.in_flight)
                    live.in_flight += 1
                    t_load = time.monotonic()
                    try:
                        await asyncio.wait_for(live.loaded.wait(), max(0.0, deadline - t_load))
                    except TimeoutError:
                        live.in_flight -= 1
                        raise Unavailable(
                            f"function {manifest.name!r} is still loading after {deadline_s:.0f} s",
                            retry_after=5,
                        ) from None
                    if live.error is not None:
                        live.in_flight -= 1
                        raise live.error
                    live.in_flight -= 1
                    self._take(live)
                    return self._assignment(
                        manifest, live, cold=True, queue_s=queue_s, load_s=time.monotonic() - t_load
                    )
                # No capacity: wait for a release or a state change.
                if not queued:
                    if self._waiting.get(manifest.name, 0) >= MAX_QUEUE_PER_FUNCTION:
                        raise TooManyRequests(
                            f"function {manifest.name!r} has {MAX_QUEUE_PER_FUNCTION} invocations "
                            "waiting already", retry_after=1,
                        )
                    self._waiting[manifest.name] = self._waiting.get(manifest.name, 0) + 1
                    queued = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(
                        f"no instance of {manifest.name!r} became free within {deadline_s:.0f} s",
                        retry_after=1,
                    )
                t_wait = time.monotonic()
                async with self._changed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        # bounded, so a notification lost between check and wait costs <= 1 s
                        await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                queue_s += time.monotonic() - t_wait
        finally:
            if queued:
                self._waiting[manifest.name] -= 1

    def _take(self, live: LiveInstance) -> None:
        live.in_flight += 1
        if live.state == InstanceState.IDLE:
            self._set_state(live, InstanceState.WARM)

    def _assignment(
        self, manifest: FunctionManifest, live: LiveInstance, *, cold: bool, queue_s: float,
        load_s: float,
    ) -> Assignment:
        return Assignment(
            function=live.record.function, model=live.record.model, instance_id=live.record.id,
            invoker_url=live.record.invoker_url, cold=cold, queue_seconds=queue_s,
            load_seconds=load_s, tier=live.record.tier, defaults=manifest.spec.generation.model_dump(),
        )

    async def release(self, instance_id: str) -> None:
        """Give back a slot taken by :meth:`acquire`. Raises InstanceNotFound for an unknown id."""
        live = self.instances.get(instance_id)
        if live is None:
            raise InstanceNotFound(f"no instance {instance_id!r}")
        live.in_flight = max(0, live.in_flight - 1)
        if live.in_flight == 0 and live.state == InstanceState.WARM:
            self._set_state(live, InstanceState.IDLE, last_used=self._clock())
        await self._notify()

    # --- starting and stopping ------------------------------------------------------------------

    def used_bytes(self) -> dict[str, int]:
        """Invoker id -> instance memory reserved on it (bytes)."""
        used: dict[str, int] = {}
        for i in self.instances.values():
            if i.state != InstanceState.STOPPED:
                used[i.record.invoker_id] = used.get(i.record.invoker_id, 0) + i.record.memory_bytes
        return used

    async def start_instance(self, manifest: FunctionManifest) -> LiveInstance:
        """Place a new instance of the function and start loading it in the background.

        Raises:
            Unavailable: no invoker runs, or none has room even after unloading idle instances.
        """
        need = manifest.spec.resources.memory
        invokers = await self._list_invokers()
        if not invokers:
            raise Unavailable("no invoker is running", retry_after=5)
        choice = choose_invoker(invokers, self.used_bytes(), need)
        while choice is None:
            victim = self._lru_idle(exclude_function=manifest.name)
            if victim is None:
                raise Unavailable(
                    f"no invoker has {need} bytes free for {manifest.name!r} and no idle instance "
                    "can be unloaded", retry_after=5,
                )
            log.info("unloading idle instance %s to make room for %s", victim.record.id, manifest.name)
            await self.stop(victim.record.id, reason="evicted for " + manifest.name)
            choice = choose_invoker(invokers, self.used_bytes(), need)
        now = self._clock()
        record = InstanceRecord(
            id=f"{manifest.name}-{uuid.uuid4().hex[:8]}", function=manifest.name,
            model=manifest.spec.model, invoker_id=choice.id, invoker_url=choice.url,
            state=InstanceState.COLD, created=now, memory_bytes=need,
        )
        live = LiveInstance(record)
        self.instances[record.id] = live
        self._dirty.add(record.id)
        self._flush_wakeup.set()
        log.info("cold start: instance %s of %s on invoker %s", record.id, manifest.name, choice.id)
        task = asyncio.create_task(self._load(live, manifest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return live

    async def _load(self, live: LiveInstance, manifest: FunctionManifest) -> None:
        self._set_state(live, InstanceState.LOADING)
        req = LoadRequest(instance_id=live.record.id, function=manifest.name,
                          model=manifest.spec.model, device=manifest.spec.resources.device)
        try:
            resp = await self._invokers.load(live.record.invoker_url, req)
        except SllmError as e:
            log.warning("instance %s failed to load: %s", live.record.id, e.message)
            live.error = e
            if live.state != InstanceState.STOPPED:
                self._set_state(live, InstanceState.STOPPED, reason=f"load failed: {e.message}")
            self.instances.pop(live.record.id, None)
        else:
            if live.state == InstanceState.STOPPED:  # stopped while loading: undo the load
                live.error = Unavailable(f"instance {live.record.id} was stopped while loading",
                                         retry_after=1)
                try:
                    await self._invokers.unload(live.record.invoker_url, live.record.id)
                except SllmError as e:
                    log.warning("unloading %s failed: %s", live.record.id, e.message)
            else:
                now = self._clock()
                self._set_state(live, InstanceState.IDLE, loaded_at=now, last_used=now,
                                load_seconds=resp.load_seconds, read_seconds=resp.read_seconds,
                                tier=resp.tier)
        live.loaded.set()
        await self._notify()

    def _lru_idle(self, exclude_function: str | None = None) -> LiveInstance | None:
        idle = [i for i in self.instances.values()
                if i.state == InstanceState.IDLE and i.in_flight == 0
                and i.record.function != exclude_function]
        return min(idle, key=lambda i: i.record.last_used or 0.0, default=None)

    async def stop(self, instance_id: str, *, reason: str, unload: bool = True) -> None:
        """Stop an instance: forget it, delete its record, and (``unload``) have its invoker
        unload it. Unload failures are logged: the invoker may be gone."""
        live = self.instances.pop(instance_id, None)
        if live is None:
            return
        self._set_state(live, InstanceState.STOPPED, reason=reason)
        log.info("instance %s stopped: %s", instance_id, reason)
        if unload:
            try:
                await self._invokers.unload(live.record.invoker_url, instance_id)
            except SllmError as e:
                log.warning("unloading %s failed: %s", instance_id, e.message)
        await self._notify()

    async def adopt(self, records: Iterable[InstanceRecord], alive: dict[str, set[str]]) -> None:
        """Rebuild the pool after a controller restart from etcd's records: loaded instances that
        their invoker still reports are adopted as idle; the other records are deleted.

        Args:
            records: instance records from etcd.
            alive: invoker id -> ids of the instances that invoker reports loaded.
        """
        for rec in records:
            if rec.state in LOADED and rec.id in alive.get(rec.invoker_id, set()):
                live = LiveInstance(rec.model_copy(update={"state": InstanceState.IDLE}))
                live.loaded.set()
                self.instances[rec.id] = live
                self._dirty.add(rec.id)
                log.info("adopted instance %s of %s", rec.id, rec.function)
            else:
                self._dirty.add(rec.id)  # not in self.instances: the flusher deletes it
        self._flush_wakeup.set()

    def views(self) -> list[InstanceView]:
        """The autoscaler's view of every instance."""
        return [
            InstanceView(id=i.record.id, function=i.record.function, model=i.record.model,
                         state=i.state, last_used=i.record.last_used or i.record.created)
            for i in self.instances.values()
        ]

    def records(self) -> list[InstanceRecord]:
        return [i.record for i in self.instances.values()]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
