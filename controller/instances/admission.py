"""Admission, the data path: how an invocation gets a slot on an instance, waits in a bounded
queue when none is free, and gives the slot back (as Knative's activator buffers requests while
a revision scales from zero: its ``throttler.go`` holds capacity and queueing).

How an invocation gets an instance (:meth:`Admission.acquire`):

1. a loaded instance of the function with fewer than ``targetConcurrency`` invocations in flight
   (the least busy) -> a warm start;
2. else an instance of it that is still starting and has a free slot -> join that cold start;
   while the load runs, the call still takes a slot that a loaded instance frees first (then
   its slot on the starting instance is given back and the load goes on for later calls): a
   call is never bound to a slow load, such as a copy of a big checkpoint from another invoker;
3. else, below ``maxInstances``, place a new instance (:meth:`Capacity.start_instance`) -> a
   cold start; with the ``ours`` policy, unless waiting for one of the function's busy instances
   is expected to be shorter than that cold start's estimate (:mod:`controller.service_time`),
   and the call has not yet waited that long (so a wrong guess costs at most twice the cold
   start);
4. else wait, in a bounded queue (429 past the function's ``maxQueue`` waiters), until an
   instance frees up, at most ``queueTimeout`` seconds (then 503 with Retry-After). Every change
   wakes every waiter, but once a placement of the function found no room, its other waiters do
   not place again until something changes (:meth:`Capacity.known_full`).

Between functions, room goes to the oldest waiting call (first come, first served). A call of
another function *blocks* a call of this one when it waits for room: its function is below
``maxInstances`` and has no instance at all, or its last placement found no invoker with room;
and it started earlier than this call. This call then does not scale out, and when its function
has several instances, it does not take an idle one big enough for the blocking function: that
function's placement unloads it instead. A call of a function with no instance counts as
started one service time earlier (the mean seconds a call of this function holds its slot,
:mod:`controller.service_time`): it overtakes at most the calls that came one round before it.
Why these rules, and the experiments that showed them: docs/architecture.md, Decisions.

Every acquired slot is given back with :meth:`Admission.release`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from controller.instances.capacity import Capacity
from controller.instances.health import InvokerHealth
from controller.instances.lifecycle import Lifecycle
from controller.instances.table import InstanceTable, LiveInstance, with_free_slot
from controller.service_time import ServiceTimes
from sllm.errors import InstanceNotFound, NotLeader, TooManyRequests, Unavailable
from sllm.manifest import FunctionManifest
from sllm.messages import Assignment
from sllm.states import LOADED, STARTING, InstanceState

log = logging.getLogger(__name__)

S = InstanceState


class Admission:
    """Slots for invocations: acquire, the bounded wait queue, fairness between functions, and
    release.

    Args:
        table: the instances.
        capacity: places new instances.
        lifecycle: stops a drained instance once its last slot comes back.
        health: probes an invoker a gateway could not reach.
    """

    def __init__(self, table: InstanceTable, capacity: Capacity, lifecycle: Lifecycle,
                 health: InvokerHealth) -> None:
        self._table = table
        self._capacity = capacity
        self._lifecycle = lifecycle
        self._health = health
        self.waiting_since: dict[str, list[float]] = {}  # function -> its queued calls' starts
        self.service = ServiceTimes()
        # called when an invocation starts waiting for capacity (the replicator pauses copies)
        self.on_queue: Callable[[], None] | None = None

    def waiting(self, function: str) -> int:
        """Invocations of ``function`` waiting for capacity now."""
        return len(self.waiting_since.get(function, ()))

    def queued(self) -> int:
        """Invocations of all functions waiting for capacity now."""
        return sum(len(w) for w in self.waiting_since.values())

    async def acquire(self, manifest: FunctionManifest, deadline_s: float | None = None, *,
                      may_migrate: bool = True, prefer: str | None = None) -> Assignment:
        """A slot on an instance of the function, starting one if needed (module docstring).

        Args:
            manifest: the function's manifest.
            deadline_s: seconds this call may wait for capacity and loading together (default:
                the function's ``queueTimeout``).
            may_migrate: whether a new instance may be placed by moving running instances away
                (false for a generation that was itself moved: moves must not chain).
            prefer: the id of an instance to take when it is loaded with a free slot (before
                the least busy one): the other choices of an ``n`` > 1 request follow the
                first, so that one engine shares their prompt's prefill.

        Raises:
            TooManyRequests: the function's wait queue is full.
            Unavailable: no instance could be had before the deadline, or no invoker can host it.
            SllmError: the load failed (ModelNotFound, CheckpointError, InvokerError).
        """
        table, capacity = self._table, self._capacity
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
                if table.closed:
                    raise NotLeader("this controller stopped leading; ask the new leader",
                                    retry_after=1)
                if joined is not None and joined.loaded.is_set():
                    live, joined = joined, None
                    live.in_flight -= 1
                    if live.error is not None:
                        raise live.error
                    if live.state in LOADED:
                        table.take(live)
                        return self._assignment(manifest, live, cold=True, queue_s=queue_s,
                                                load_s=time.monotonic() - t_join)
                    continue  # its invoker died while loading: place again
                cands = table.candidates(manifest)
                loaded = with_free_slot(cands, target)
                blocker = self._blocker(manifest.name, start) if cands else None
                if blocker is not None and len(cands) > 1:
                    # room goes to the older call: idle instances it could use are left to it
                    need = table.manifests[blocker].spec.resources.memory
                    loaded = [i for i in loaded if i.in_flight or i.record.memory_bytes < need]
                if loaded:
                    if joined is not None:  # a loaded instance freed a slot before the load ended
                        joined.in_flight -= 1
                        queue_s += time.monotonic() - t_join
                        joined = None
                    live = next((i for i in loaded if i.record.id == prefer), None) or min(
                        loaded, key=lambda i: i.in_flight)
                    table.take(live)
                    return self._assignment(manifest, live, cold=False, queue_s=queue_s, load_s=0.0)
                if joined is None:
                    loading = [i for i in cands if i.state in STARTING and i.in_flight < target]
                    live = min(loading, key=lambda i: i.in_flight) if loading else None
                    if live is not None:
                        live.in_flight += 1  # before any await: the slot is this call's
                    elif (len(cands) < scaling.maxInstances and blocker is None
                          and not capacity.known_full(manifest.name)):
                        # reserves a slot on the new instance before its first await
                        live = await capacity.start_instance(
                            manifest, reserve=True, may_migrate=may_migrate,
                            unless_wait=self._expected_wait(manifest, cands, queued),
                            waited_s=queue_s)
                        now = table.candidates(manifest)
                        if live is None and (len(now) > len(cands) or with_free_slot(now, target)):
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
                    await table.wait_for_change(min(remaining, 1.0))
                    continue
                # No capacity: wait for a release or a state change.
                if not queued:
                    if self.waiting(manifest.name) >= scaling.maxQueue:
                        raise TooManyRequests(
                            f"function {manifest.name!r} has {scaling.maxQueue} invocations "
                            "waiting already", retry_after=1,
                        )
                    self.waiting_since.setdefault(manifest.name, []).append(start)
                    table.manifests[manifest.name] = manifest
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
                await table.wait_for_change(min(remaining, 1.0))
                queue_s += time.monotonic() - t_wait
        finally:
            if joined is not None:  # gave up on the load (deadline, cancelled): the slot goes back
                joined.in_flight -= 1
            if queued:
                self.waiting_since[manifest.name].remove(start)
                if not self.waiting_since[manifest.name]:  # only functions with waiters stay
                    del self.waiting_since[manifest.name]
                    capacity.no_room.pop(manifest.name, None)

    def _blocker(self, function: str, since: float) -> str | None:
        """Another function with a call that waits for room and started before a call of
        ``function`` that started at ``since`` (monotonic seconds), or None: the call gives way
        to it (module docstring: the oldest call first). Its oldest call's start counts one
        mean service time of ``function`` earlier when it has no instance at all (unknown mean:
        it always goes first). The oldest such function is returned."""
        others = [f for f in self.waiting_since if f != function]  # each queued with its manifest
        if not others:
            return None
        count: dict[str, int] = {}
        for i in self._table.instances.values():
            if i.state in LOADED or i.state in STARTING:
                count[i.record.function] = count.get(i.record.function, 0) + 1
        credit = self.service.mean(function)
        best: tuple[float, str] | None = None
        for f in others:
            have = count.get(f, 0)
            if have >= self._table.manifests[f].spec.scaling.maxInstances:
                continue  # it waits for its own instances, not for room
            if have and f not in self._capacity.no_room:
                continue  # it waits by choice (a busy instance is expected sooner)
            oldest = min(self.waiting_since[f])
            if not have:
                oldest -= float("inf") if credit is None else credit
            if oldest < since and (best is None or oldest < best[0]):
                best = (oldest, f)
        return None if best is None else best[1]

    def _expected_wait(self, manifest: FunctionManifest, cands: list[LiveInstance],
                       queued: bool) -> float | None:
        """``ours``: seconds until one of the function's busy instances frees a slot for a new
        invocation (None: unknown, or another policy)."""
        if self._capacity.policy != "ours":
            return None
        started = [t for i in cands if i.state in LOADED for t in i.taken]
        started += [i.record.ready_by or 0.0 for i in cands if i.state in STARTING
                    for _ in range(i.in_flight)]
        ahead = self.waiting(manifest.name) - int(queued)
        return self.service.expected_wait(manifest.name, started, self._table.clock(), ahead)

    def _assignment(self, manifest: FunctionManifest, live: LiveInstance, *, cold: bool,
                    queue_s: float, load_s: float) -> Assignment:
        return Assignment(
            function=live.record.function, model=live.record.model, instance_id=live.record.id,
            invoker_url=live.record.invoker_url, cold=cold, queue_seconds=queue_s,
            load_seconds=load_s, tier=live.record.tier, defaults=manifest.spec.generation.sampling(),
        )

    async def release(self, instance_id: str, *, failed: str | None = None,
                      moved_to: str | None = None) -> None:
        """Give back a slot taken by :meth:`acquire`. ``failed`` says the invoker could not be
        reached: it is probed at once and its instances are marked lost if it is down.
        ``moved_to`` says the invocation's generation migrated to that instance, whose slot
        the migration reserved already (the slot is released there when the stream ends).

        Raises:
            InstanceNotFound: an unknown id (a lost or recently stopped instance's id is not an
                error).
        """
        table = self._table
        live = table.instances.get(instance_id)
        if live is None:
            if instance_id in table.lost or instance_id in table.stopped:
                return
            raise InstanceNotFound(f"no instance {instance_id!r}")
        if moved_to is not None:
            table.claim(moved_to)
        if live.taken:
            began = live.taken.popleft()
            if moved_to is None:
                self.service.observe(live.record.function, table.clock() - began)
        live.in_flight = max(0, live.in_flight - 1)
        if live.in_flight == 0:
            live.taken.clear()  # slots reserved for migrations were never stamped
            if live.state == S.ACTIVE:
                table.set_state(live, S.IDLE, last_used=table.clock())
            elif live.state == S.DRAINING:
                await self._lifecycle.stop(instance_id, reason=live.record.reason or "drained")
        if failed is not None:
            table.spawn(self._health.check(live.record.invoker_id, live.record.invoker_url, failed))
        await table.notify()
