"""Burst-ready checkpoint replication: copies of a function's checkpoint are made ahead of need.

A burst of a function scales it out to ``maxInstances`` instances within a second or two. An
invoker without a local copy of the checkpoint must first fetch it (a ``remote`` start: the
network tier, or the store root), so when the invokers holding a copy cannot host that many
instances, part of the burst waits for copies on its critical path (placement keeps copies
few, since a local copy starts fastest). Why: docs/architecture.md, Decisions ("Burst-ready
replication").

The rule (:func:`plan`): a function with at least one loaded instance (it is in use) wants its
checkpoint held by invokers that together can host ``maxInstances`` of its instances
(``floor(invoker memory / instance memory)`` each) -- or by every invoker that can host one.
While it has fewer, one more copy is made, to the invoker that can host the most instances of
it. Busier functions (more loaded instances) come first. A copy is a real transfer from a peer
holding the checkpoint (DRAM tier first) or the store root (``PUT /v1/checkpoints/{model}`` on
the invoker, :mod:`store.transfer`: resumable, checksummed); the invoker then publishes the
new tier in etcd like any other copy.

Copies are background work and give way to invocations (:class:`Replicator`):

- none starts while an invocation waits for an instance (a burst is on: a copy's reads,
  checksums and writes take the cores and disks its calls need), nor until :data:`CALM_S`
  seconds after the last one waited (a burst comes in waves);
- the moment an invocation starts waiting, the copies running are paused
  (``DELETE /v1/checkpoints/{model}/replication``); each keeps its partial data, and is planned
  again once calm, when the transfer continues where it stopped. A copy a load has joined is
  not paused (the load needs it);
- none goes to an invoker that is loading an instance (its disk and network serve a cold
  start now) or already receiving a copy, and at most :data:`COPIES_IN_FLIGHT` run at once.

Why copies give way: docs/architecture.md, Decisions ("Copies give way to invocations").

This is not in ServerlessLLM, which fetches a checkpoint into a server's SSD on a miss (§4-6);
it trades disk space and idle network time for fewer remote starts. A copy failing is logged
and not tried again for :data:`RETRY_S` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.instances import InstancePool
from controller.invoker_client import InvokerClient
from controller.placement import holder_urls
from sllm.errors import SllmError, Unavailable
from sllm.manifest import FunctionManifest
from sllm.messages import InvokerRecord
from sllm.states import LOADED, STARTING
from sllm.tiers import Tier

log = logging.getLogger(__name__)

COPIES_IN_FLIGHT = 4
"""Replications running at once in the cluster (one per receiving invoker at most)."""

RETRY_S = 60.0
"""Seconds before a copy that failed is tried again."""

CALM_S = 5.0
"""Seconds without an invocation waiting for an instance before copies start again."""


@dataclass(frozen=True)
class Copy:
    """One replication to make.

    Attributes:
        function: the function whose burst it prepares for.
        model: the checkpoint to copy.
        invoker_id, url: the invoker receiving the copy.
        sources: URLs of the invokers holding the checkpoint, DRAM tier first (the receiving
            invoker falls back to the store root).
        hosts: instances of the function the invokers holding a copy can host now (before it).
    """

    function: str
    model: str
    invoker_id: str
    url: str
    sources: tuple[str, ...]
    hosts: int


def plan(functions: Iterable[FunctionManifest], loaded: Mapping[str, int],
         tiers: Mapping[str, Mapping[str, Tier]], invokers: Sequence[InvokerRecord], *,
         busy: Collection[str] = (), skip: Collection[tuple[str, str]] = (),
         limit: int = COPIES_IN_FLIGHT) -> list[Copy]:
    """The copies to start now (module docstring: the rule).

    Args:
        functions: the registered functions.
        loaded: function name -> its loaded instances now; functions with none are left out.
        tiers: model -> invoker id -> the fastest tier holding its checkpoint there.
        invokers: the live invokers.
        busy: ids of invokers that must not receive a copy now (loading an instance, or
            receiving a copy already).
        skip: (model, invoker id) pairs not to copy (a recent copy of it failed).
        limit: at most this many copies (``COPIES_IN_FLIGHT`` less those running).

    Returns:
        At most ``limit`` copies, at most one per receiving invoker and per model, busier
        functions first (more loaded instances, then by name).
    """
    out: list[Copy] = []
    taken = set(busy)
    models: set[str] = set()
    urls = {i.id: i.url for i in invokers}
    for m in sorted((f for f in functions if loaded.get(f.name, 0) > 0),
                    key=lambda f: (-loaded[f.name], f.name)):
        if len(out) >= limit:
            break
        model, need = m.spec.model, m.spec.resources.memory
        if model in models or need <= 0:
            continue
        held = {i: t for i, t in tiers.get(model, {}).items() if i in urls}
        hosts = sum(r.memory_bytes // need for r in invokers if r.id in held)
        if hosts >= m.spec.scaling.maxInstances:
            continue
        free = [r for r in invokers if r.id not in held and r.id not in taken
                and (model, r.id) not in skip and r.memory_bytes >= need]
        if not free:
            continue
        to = max(free, key=lambda r: (r.memory_bytes // need, r.id))
        out.append(Copy(function=m.name, model=model, invoker_id=to.id, url=to.url,
                        sources=tuple(holder_urls(held, urls)), hosts=hosts))
        taken.add(to.id)
        models.add(model)
    return out


class Replicator:
    """Makes the copies :func:`plan` asks for, in background tasks, and pauses them when an
    invocation starts waiting for an instance (module docstring); the leading controller calls
    :meth:`tick` once per reconcile pass, and :meth:`close` when it stops leading.

    Args:
        client: the HTTP client for invokers.
        pool: the leader's instance pool: its instances say which functions are in use and
            which invokers are loading; a finished copy is added to its checkpoint map, so the
            next decision sees it before the invoker's etcd record is read back. Its
            ``on_queue`` hook is set to :meth:`pause` (until :meth:`close`).
        clock: monotonic seconds; a parameter so tests can drive time.
    """

    def __init__(self, client: InvokerClient, pool: InstancePool, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._pool = pool
        self._clock = clock
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}  # (model, invoker id)
        self._copies: dict[tuple[str, str], Copy] = {}  # the copy each running task makes
        self._pausing: set[tuple[str, str]] = set()  # running copies asked to pause
        self._failed: dict[tuple[str, str], float] = {}  # -> monotonic seconds it failed
        self._busy_at = -CALM_S  # monotonic seconds an invocation was last seen waiting
        self._pauses: set[asyncio.Task[None]] = set()
        self.made = 0  # copies completed (for logs and tests)
        pool.admission.on_queue = self.pause

    def tick(self, invokers: Sequence[InvokerRecord],
             functions: Mapping[str, FunctionManifest]) -> list[Copy]:
        """Start the copies :func:`plan` gives for the pool's state now, when calm (module
        docstring: none while an invocation waits for an instance, nor :data:`CALM_S` seconds
        after; the copies running are paused then); returns them."""
        now = self._clock()
        if self._pool.admission.queued():
            self.pause()  # notes the time too
            return []
        if now - self._busy_at < CALM_S:
            return []
        self._failed = {k: t for k, t in self._failed.items() if now - t < RETRY_S}
        loaded: dict[str, int] = {}
        busy = {inv for _, inv in self.running}
        for live in self._pool.table.instances.values():
            if live.state in LOADED:
                loaded[live.record.function] = loaded.get(live.record.function, 0) + 1
            elif live.state in STARTING:
                busy.add(live.record.invoker_id)
        copies = plan(functions.values(), loaded, self._pool.table.tiers, invokers, busy=busy,
                      skip=self._failed.keys(), limit=COPIES_IN_FLIGHT - len(self.running))
        for c in copies:
            key = (c.model, c.invoker_id)
            task = asyncio.create_task(self._copy(c))
            self.running[key] = task
            self._copies[key] = c

            def done(_: object, key: tuple[str, str] = key) -> None:
                self.running.pop(key, None)
                self._copies.pop(key, None)
                self._pausing.discard(key)

            task.add_done_callback(done)
        return copies

    def pause(self) -> None:
        """Ask the invokers to pause the copies running (each once; module docstring). Called
        by the pool the moment an invocation starts waiting for an instance, and by
        :meth:`tick` while one waits. Returns at once: the requests run in tasks."""
        self._busy_at = self._clock()
        for key, c in self._copies.items():
            if key not in self._pausing:
                self._pausing.add(key)
                task = asyncio.create_task(self._pause(c))
                self._pauses.add(task)
                task.add_done_callback(self._pauses.discard)

    async def _pause(self, c: Copy) -> None:
        try:
            paused = await self._client.pause_replication(c.url, c.model)
        except SllmError as e:
            log.warning("could not pause the replication of %s to %s: %s", c.model,
                        c.invoker_id, e.message)
            return
        if paused:
            log.info("paused the replication of %s to %s: an invocation waits for an instance",
                     c.model, c.invoker_id)

    async def _copy(self, c: Copy) -> None:
        key = (c.model, c.invoker_id)
        log.info("replicating %s (function %s) to %s: its holders host %d instances; sources: %s",
                 c.model, c.function, c.invoker_id, c.hosts, ", ".join(c.sources) or "the store root")
        try:
            resp = await self._client.replicate(c.url, c.model, list(c.sources))
        except SllmError as e:
            if key in self._pausing and isinstance(e, Unavailable):
                return  # paused, not failed: planned again once calm, and continued
            log.warning("replicating %s to %s failed (retried in %.0f s): %s", c.model,
                        c.invoker_id, RETRY_S, e.message)
            self._failed[key] = self._clock()
            return
        self._pool.table.note_copy(c.model, c.invoker_id)
        self.made += 1
        log.info("replicated %s to %s: %d bytes from %s in %.3f s", c.model, c.invoker_id,
                 resp.transferred_bytes, resp.source or "(current already)", resp.seconds)

    async def close(self) -> None:
        """Stop waiting for the copies running (the invokers finish them regardless) and stop
        being told of waiting invocations."""
        if self._pool.admission.on_queue == self.pause:
            self._pool.admission.on_queue = None
        tasks = [*self.running.values(), *self._pauses]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
