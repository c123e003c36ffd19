"""Capacity: deciding where a new instance goes and reserving what the decision needs, in one
step.

A cold start (:meth:`Capacity.start_instance`) lists the invokers (an await), then, with no
await until the new instance exists, decides (:meth:`Capacity.decide`: the placement view and
:func:`controller.placement.place`), retires the idle instances the decision unloads, and, when
it moves running instances away (ServerlessLLM §5-6), finds or starts a destination for each
and holds its slots (:meth:`Capacity.destination_now`). No other placement or invocation can
take room a decision counted on: this file is where that rule lives. The load, the unloads and
the migrations are then carried out in the background (:mod:`controller.instances.lifecycle`).

When the best candidate must first move running inferences away, what happens depends on the
``migration`` mode; in ``live`` and ``preempt``, while any call waits for capacity the best
place without migration is taken (:meth:`Capacity.decide` says why):

- ``live`` (default): each running instance there migrates to a destination of its function
  found idle or started elsewhere; the new instance loads once they have moved. With no
  destination for one, the best place without migration is taken;
- ``preempt`` (the baseline of ``bench.replay``): the running instances are unloaded at once;
  their invocations resume wherever the gateway finds room, recomputing from their tokens;
- ``off``: the best candidate that needs neither is taken, or the call waits.

:meth:`Capacity.migrate` is what an operator's ``sllm instance migrate`` calls.

One module for one rule: deciding and reserving must not be split across an await, so every
step that takes room (the decision, the evictions, the migration destinations and their slots)
is here, together.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

from controller.estimator import Estimate, MigrationCost
from controller.instances.health import InvokerHealth
from controller.instances.lifecycle import Lifecycle
from controller.instances.table import InstanceTable, LiveInstance, with_free_slot
from controller.instances.view import build_view
from controller.placement import ClusterView, Placement, PlacementRequest, Policy, place
from sllm.config import MIGRATION_FIXED_S, MIGRATION_PER_TOKEN_S
from sllm.errors import Conflict, InstanceNotFound, SllmError, Unavailable
from sllm.manifest import FunctionManifest, device_serves
from sllm.messages import (
    EstimateRecord,
    InstanceRecord,
    InvokerRecord,
    MigrateResponse,
    PlacementRecord,
)
from sllm.states import LOADED, InstanceState

log = logging.getLogger(__name__)

S = InstanceState

MigrationMode = Literal["live", "preempt", "off"]
MIGRATION_MODES: tuple[MigrationMode, ...] = ("live", "preempt", "off")

NO_ROOM_RECHECK_S = 0.25
"""Seconds a placement that found no room for a function stands for its other waiters, while
nothing is released or changes state (the bound covers changes that notify no one, such as an
invoker joining)."""


class Capacity:
    """Placement decisions and cold starts over the table's instances.

    Args:
        table: the instances.
        lifecycle: carries out loads, unloads and migrations.
        health: which invokers are suspected dead (left out of placement).
        list_invokers: returns the live invokers (from etcd, or the last known list).
        model_bytes: checkpoint size of a model in the store root (bytes); raises ModelNotFound.
        queued: how many calls wait for capacity now (no migration while any does).
        policy: the placement policy (``ours`` unless comparing, see controller.placement).
        migration: what to do when room must be made from running instances (module
            docstring).
        manifest_of: a function's current manifest by name (to start a migration's
            destination); without it nothing migrates.
    """

    def __init__(
        self, table: InstanceTable, lifecycle: Lifecycle, health: InvokerHealth,
        list_invokers: Callable[[], Awaitable[list[InvokerRecord]]],
        model_bytes: Callable[[str], int], queued: Callable[[], int], *,
        policy: Policy = "ours", migration: MigrationMode = "live",
        manifest_of: Callable[[str], Awaitable[FunctionManifest]] | None = None,
    ) -> None:
        self._table = table
        self._lifecycle = lifecycle
        self._health = health
        self._list_invokers = list_invokers
        self._model_bytes = model_bytes
        self._queued = queued
        self._manifest_of = manifest_of
        self.policy: Policy = policy
        self.mode: MigrationMode = migration if manifest_of is not None else "off"
        self.migration = MigrationCost(MIGRATION_PER_TOKEN_S, MIGRATION_FIXED_S)
        # function -> (table.changes, monotonic seconds) when a placement of it found no room
        self.no_room: dict[str, tuple[int, float]] = {}

    def known_full(self, function: str) -> bool:
        """Whether a placement of ``function`` found no room since the last change (and less
        than :data:`NO_ROOM_RECHECK_S` ago): its other waiters then do not place again."""
        seen = self.no_room.get(function)
        return (seen is not None and seen[0] == self._table.changes
                and time.monotonic() - seen[1] < NO_ROOM_RECHECK_S)

    def view(self, invokers: Iterable[InvokerRecord], model: str | None = None) -> ClusterView:
        """The scheduler's view for placing an instance of ``model``
        (:func:`controller.instances.view.build_view`)."""
        return build_view(self._table, self._health, invokers, model, self._model_bytes)

    def decide(self, manifest: FunctionManifest, invokers: list[InvokerRecord], *,
               may_migrate: bool = True) -> Placement | None:
        """The placement decision for a new instance of ``manifest``, or None when it must wait
        for capacity. A decision that needs running instances moved away is kept in ``live``
        and ``preempt`` modes, unless ``may_migrate`` is false, a migration failed in the last
        :data:`~controller.instances.lifecycle.MIGRATION_BACKOFF_S`, or any call waits for
        capacity (this one included, once it has waited); otherwise it is replaced by the best
        one without, and with none the instance waits (why: docs/architecture.md, Decisions).

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
        queued = self._queued()
        if decision is not None and decision.migrate and not (
                may_migrate and self.mode != "off" and not queued
                and time.monotonic() >= self._lifecycle.no_migration_until):
            log.info("best place for %s needs migrating %s away (%.3f s); taking the best place "
                     "without%s", manifest.name, ", ".join(decision.migrate),
                     decision.chosen.total_s, f" ({queued} calls wait for capacity)" if queued else "")
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
        as idle to start another. ``unless_wait`` is the expected wait (seconds) for a busy
        instance of the function: it also returns None when that, and the ``waited_s`` seconds
        the caller has waited so far, are both shorter than the new instance's startup estimate
        (nothing is evicted then).

        The decision, the unloads it names and, when it moves running instances away, their
        destinations are taken in one step, with no await between them (:meth:`place_now`).

        Raises:
            Unavailable: no invoker runs, or none could ever hold the instance.
            ModelNotFound: the model left the store root.
        """
        table = self._table
        changes = table.changes  # before the await: a change meanwhile voids a "no room"
        table.manifests[manifest.name] = manifest
        invokers = await self._list_invokers()
        if not invokers:
            raise Unavailable("no invoker is running", retry_after=5)
        if may_migrate and self.mode == "live":
            await self._learn_manifests()  # a mover's destination is placed without an await
        # no await from here until the instance (and its movers' destinations) exist
        scaling = manifest.spec.scaling
        cands = table.candidates(manifest)
        if len(cands) >= scaling.maxInstances:
            return None  # another call started one while this one listed the invokers
        if reserve and with_free_slot(cands, scaling.targetConcurrency):
            return None  # a slot freed meanwhile: the caller takes it (a warm start)
        return self.place_now(manifest, invokers, reserve=reserve, may_migrate=may_migrate,
                              unless_wait=unless_wait, waited_s=waited_s, changes=changes)

    async def _learn_manifests(self) -> None:
        """Fetch the manifest of every function with a loaded instance that the table has not
        seen yet (adopted from an earlier controller), so that a migration's destination can
        be placed in the same step as the decision that moves it. Usually none."""
        if self._manifest_of is None:
            return
        table = self._table
        for function in {i.record.function for i in table.instances.values()
                         if i.state in LOADED and i.record.function not in table.manifests}:
            try:
                table.manifests[function] = await self._manifest_of(function)
            except SllmError as e:  # deleted meanwhile: its instances do not move
                log.info("no manifest for %s (%s): its instances cannot migrate", function,
                         e.message)

    def place_now(self, manifest: FunctionManifest, invokers: list[InvokerRecord], *,
                  reserve: bool, may_migrate: bool, unless_wait: float | None = None,
                  waited_s: float = 0.0, changes: int | None = None, send: bool = True
                  ) -> LiveInstance | None:
        """:meth:`start_instance` after its awaits: decide among ``invokers``, unload the idle
        instances the decision names, move the running ones away (``live`` mode: a destination
        for each is found or started now, its slots held, see :meth:`_reserve_destinations`;
        when one has nowhere to go the best place without migration is taken instead;
        ``preempt`` mode: they are unloaded), and create the instance. Runs without an await.
        ``send`` false leaves the load unsent (the caller sends it); ``changes`` is the
        notification count before the caller's awaits (None: a migration's destination, whose
        "no room" is not remembered).

        Raises:
            Unavailable: no invoker could ever hold the instance.
            ModelNotFound: the model left the store root.
        """
        table, lifecycle = self._table, self._lifecycle
        t0 = time.perf_counter()
        decision = self.decide(manifest, invokers, may_migrate=may_migrate)
        moves: dict[str, LiveInstance] = {}
        while True:
            if decision is None:
                log.info("no room for %s on any invoker: waiting for an instance to free up",
                         manifest.name)
                # (no room without migration says nothing of the room with it)
                if changes is not None and may_migrate:
                    self.no_room[manifest.name] = (changes, time.monotonic())
                return None
            if unless_wait is not None and max(unless_wait, waited_s) < decision.chosen.total_s:
                log.info("waiting for a busy instance of %s (expected in %.3f s, waited %.3f s) "
                         "instead of a cold start on %s", manifest.name, unless_wait, waited_s,
                         decision.chosen.brief())
                self.no_room.pop(manifest.name, None)  # it waits by choice, not for room
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
        self.no_room.pop(manifest.name, None)
        for iid in decision.evict:  # retired before any await: no invocation can take them now
            lifecycle.retire_and_unload(
                iid, f"evicted (least recently used idle) for {manifest.name}", if_idle=True)
        if self.mode == "preempt":
            for iid in decision.migrate:
                lifecycle.retire_and_unload(iid, f"preempted: making room for {manifest.name}")
        now = table.clock()
        inv = decision.invoker
        record = InstanceRecord(
            id=f"{manifest.name}-{uuid.uuid4().hex[:8]}", function=manifest.name,
            model=manifest.spec.model, invoker_id=inv.id, invoker_url=inv.url,
            state=S.PENDING, created=now, memory_bytes=manifest.spec.resources.memory,
            placement=placement_record(decision, list(decision.evict), now, decision_s),
            ready_by=now + decision.chosen.total_s,
        )
        live = LiveInstance(record, in_flight=int(reserve), max_tokens=manifest.spec.generation.maxTokens,
                            device=manifest.spec.resources.device,
                            scheduling=manifest.spec.scheduling)
        table.instances[record.id] = live
        log.info("cold start: instance %s of %s on %s; %d candidates, decided in %.2f ms; "
                 "next best: %s", record.id, manifest.name, decision.chosen.brief(),
                 decision.considered, decision_s * 1e3,
                 "; ".join(e.brief() for e in decision.candidates[:4]
                           if e.invoker_id != inv.id)[:400] or "none")
        reason = f"making room for {manifest.name}"
        for iid, dest in moves.items():
            mover = table.instances[iid]
            if dest.state == S.PENDING:  # started for it, not an idle one
                lifecycle.send(dest)
            live.after.append(table.spawn(  # cancelled when the table closes
                lifecycle.move(mover, dest, mover.in_flight, reason=reason)))
        if send:
            lifecycle.send(live)
        return live

    # --- migration destinations -----------------------------------------------------------------

    def _reserve_destinations(self, ids: Iterable[str], invokers: list[InvokerRecord],
                              function: str) -> dict[str, LiveInstance] | None:
        """Destinations for the running instances ``ids``, which move away to make room for a
        new instance of ``function``, taken now (:meth:`destination_now`): each mover is marked
        migrating and its destination holds a slot per invocation in flight, so no other
        placement or invocation takes either. Returns mover id -> destination, or None when one
        has nowhere to go (what was reserved for the others is given back; a destination whose
        placement unloaded idle instances leaves them unloaded)."""
        table = self._table
        moves: dict[str, LiveInstance] = {}
        for iid in ids:
            mover = table.instances.get(iid)
            manifest = table.manifests.get(mover.record.function) if mover is not None else None
            dest = None
            if mover is not None and manifest is not None and mover.state in LOADED:
                try:
                    dest = self.destination_now(mover, manifest, invokers, only=None,
                                                reason=f"making room for {function}")
                except SllmError as e:
                    log.info("no destination for %s: %s", iid, e.message)
            if dest is None:
                for moved, d in moves.items():
                    self._give_back(table.instances[moved], d)
                return None
            moves[iid] = dest
        return moves

    def destination_now(self, mover: LiveInstance, manifest: FunctionManifest,
                        invokers: list[InvokerRecord], *, only: str | None, reason: str,
                        slots: int | None = None) -> LiveInstance | None:
        """Reserve a migration destination for the loaded instance ``mover``, without an await:
        an idle instance of its function on another invoker (``only``: that one), else a new
        one placed among the other ``invokers`` without moving anything (its load unsent: the
        caller sends it). The mover is marked migrating (no invocation takes it meanwhile) and
        the destination holds one slot per invocation in flight on the mover (``slots``: that
        many, for a migration of some of them). Returns None when no invoker has room.

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
            dest = self.place_now(manifest, others, reserve=False, may_migrate=False, send=False)
            if dest is None:
                return None
        self._table.set_state(mover, S.MIGRATING, reason=reason)
        self._table.hold(dest, mover.in_flight if slots is None else slots)
        return dest

    def _give_back(self, mover: LiveInstance, dest: LiveInstance) -> None:
        """Undo :meth:`destination_now` for a migration that will not happen."""
        table = self._table
        table.unhold(dest, mover.in_flight)
        if dest.state == S.PENDING and dest.in_flight == 0:
            table.instances.pop(dest.record.id, None)  # never sent nor recorded: forgotten
        if mover.state == S.MIGRATING:
            table.set_state(mover, S.ACTIVE if mover.in_flight else S.IDLE, reason=None)

    def _idle_destination(self, source: LiveInstance, only: str | None) -> LiveInstance | None:
        """An idle instance of the source's function on another invoker (``only``: that one)."""
        for live in self._table.instances.values():
            rec = live.record
            if (rec.function == source.record.function and rec.model == source.record.model
                    and live.state == S.IDLE and live.in_flight == 0
                    and rec.invoker_id != source.record.invoker_id
                    and (only is None or rec.invoker_id == only)):
                return live
        return None

    def _loaded(self, instance_id: str, to: str | None) -> LiveInstance:
        """The loaded instance ``instance_id``, as :meth:`migrate` may move it (its errors)."""
        live = self._table.instances.get(instance_id)
        if live is None:
            raise InstanceNotFound(f"no instance {instance_id!r}")
        if live.state not in LOADED:
            raise Conflict(f"instance {instance_id} is {live.state.value}; only an idle or active "
                           "instance can migrate")
        if to is not None and to == live.record.invoker_id:
            raise Conflict(f"instance {instance_id} is on invoker {to} already")
        return live

    async def migrate(self, instance_id: str, *, to: str | None = None, reason: str,
                      generations: int | None = None) -> tuple[MigrateResponse, InstanceRecord]:
        """Live-migrate a loaded instance (ServerlessLLM §5), as an operator asks: find or start
        an instance of its function on another invoker (``to``: that one) and move every
        generation there by its tokens (:meth:`Lifecycle.move`); with ``generations``, at most
        that many of its running generations, the instance serving on with the rest.

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
        slots = live.in_flight if generations is None else min(generations, live.in_flight)
        dest = self.destination_now(live, manifest, invokers, only=to, reason=reason,
                                    slots=slots)
        if dest is None:
            raise Unavailable(f"no invoker has room for a destination of {instance_id}",
                              retry_after=5)
        if dest.state == S.PENDING:  # started for it, not an idle one
            self._lifecycle.send(dest)
        return await self._lifecycle.move(live, dest, slots, reason=reason, limit=generations)


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
