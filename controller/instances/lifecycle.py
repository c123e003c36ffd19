"""Carrying out what capacity decided: sending an instance's load, unloading, stopping and
draining instances, and moving a migrating instance's generations to its destination.

A load is sent after its instance's record is in etcd (:meth:`InstanceTable.write_now`) and
after the migrations that make room for it (``LiveInstance.after``); an instance stopped while
it loads is unloaded when the load answers. A migration (ServerlessLLM §5) waits for its
destination to load, then has the source's invoker move every generation by its tokens
(:mod:`invoker.migration`); the source then drains, or goes on serving when it is abandoned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from controller.instances.table import InstanceTable, LiveInstance
from controller.placement import holder_urls
from sllm.errors import MigrationFailed, SllmError, Unavailable
from sllm.messages import InstanceRecord, LoadRequest, LoadResponse, MigrateRequest, MigrateResponse
from sllm.states import FINAL, LOADED, STARTING, InstanceState

log = logging.getLogger(__name__)

S = InstanceState

MIGRATION_BACKOFF_S = 5.0
"""Seconds placement leaves migration out after a migration meant to make room failed (so a
cluster with no room anywhere does not retry the same doomed migration in a loop)."""


class InvokerCalls(Protocol):
    """What the lifecycle needs of the invokers' client
    (:class:`controller.invoker_client.InvokerClient`)."""

    async def load(self, invoker_url: str, request: LoadRequest) -> LoadResponse: ...

    async def unload(self, invoker_url: str, instance_id: str) -> None: ...

    async def migrate(self, invoker_url: str, instance_id: str, request: MigrateRequest
                      ) -> MigrateResponse: ...


class Lifecycle:
    """Loads, unloads, stops and migrations of the table's instances.

    Args:
        table: the instances.
        invokers: the invokers' client.
    """

    def __init__(self, table: InstanceTable, invokers: InvokerCalls) -> None:
        self._table = table
        self._invokers = invokers
        self.no_migration_until = 0.0  # monotonic seconds (MIGRATION_BACKOFF_S)

    # --- loading --------------------------------------------------------------------------------

    def send(self, live: LiveInstance) -> None:
        """Record a new instance in etcd, then send its load, in the background."""
        self._table.spawn(self._record_and_load(live))

    async def _record_and_load(self, live: LiveInstance) -> None:
        if live.state in STARTING:
            await self._table.write_now(live)
        await self.load(live)

    def sources(self, model: str, exclude: str) -> list[str]:
        """URLs of live invokers holding ``model``'s checkpoint, DRAM tier first."""
        return holder_urls(self._table.tiers.get(model, {}), self._table.urls, exclude)

    async def load(self, live: LiveInstance) -> None:
        """Have the instance's invoker load it, after the migrations making room for it; sets
        ``live.loaded`` in every case (``live.error`` says why it did not load)."""
        table, rec = self._table, live.record
        if live.after:  # running instances migrate away first
            results = await asyncio.gather(*live.after, return_exceptions=True)
            failures = [why for why in map(_migration_failure, results) if why is not None]
            if failures and live.state in STARTING:
                self.no_migration_until = time.monotonic() + MIGRATION_BACKOFF_S
                # no error: a waiting acquire places again (migration is left out a while)
                table.retire(rec.id, f"room could not be made by migration: {failures[0]}")
                live.loaded.set()
                await table.notify()
                return
        if live.state not in STARTING:  # stopped or lost before its load was sent
            if live.state != S.LOST and live.error is None:
                live.error = Unavailable(f"instance {rec.id} was stopped before it loaded",
                                         retry_after=1)
            live.loaded.set()
            await table.notify()
            return
        if live.state == S.PENDING:
            table.set_state(live, S.LOADING)
        req = LoadRequest(instance_id=rec.id, function=rec.function, model=rec.model,
                          device=live.device, sources=self.sources(rec.model, rec.invoker_id),
                          memory_bytes=rec.memory_bytes, scheduling=live.scheduling)
        try:
            resp = await self._invokers.load(rec.invoker_url, req)
        except SllmError as e:
            if live.state not in FINAL:
                log.warning("instance %s failed to load: %s", rec.id, e.message)
                live.error = e
                table.set_state(live, S.STOPPED, reason=f"load failed: {e.message}")
                table.instances.pop(rec.id, None)
        else:
            if live.state in FINAL or live.state == S.DRAINING:  # stopped while loading: undo it
                live.error = Unavailable(f"instance {rec.id} was stopped while loading", retry_after=1)
                if live.state == S.DRAINING:
                    await self.stop(rec.id, reason=live.record.reason or "stopped while loading")
                elif live.state == S.STOPPED:
                    await self.unload(live)
            else:
                now = table.clock()
                live.nbytes = resp.nbytes
                table.set_state(live, S.IDLE, loaded_at=now, last_used=now, ready_by=None,
                                load_seconds=resp.load_seconds, read_seconds=resp.read_seconds,
                                kv_budget_tokens=resp.kv_budget_tokens,
                                tier=resp.tier, transfer_seconds=resp.transfer_seconds or None,
                                fetched_from=resp.source)
                table.note_copy(rec.model, rec.invoker_id)
        live.loaded.set()
        await table.notify()

    # --- stopping -------------------------------------------------------------------------------

    async def unload(self, live: LiveInstance) -> None:
        """Have the invoker unload the instance; a failure is logged (the invoker may be gone)."""
        try:
            await self._invokers.unload(live.record.invoker_url, live.record.id)
        except SllmError as e:
            log.warning("unloading %s failed: %s", live.record.id, e.message)

    def retire_and_unload(self, instance_id: str, reason: str, *, if_idle: bool = False) -> None:
        """:meth:`InstanceTable.retire` at once, then unload the instance in the background (for
        a loaded instance taken away mid-decision: evicted or preempted)."""
        retired = self._table.retire(instance_id, reason, if_idle=if_idle)
        if retired is not None:
            self._table.spawn(self.unload(retired[0]))

    async def stop(self, instance_id: str, *, reason: str, unload: bool = True,
                   if_idle: bool = False) -> None:
        """Stop an instance: forget it, delete its record, and (``unload``) have its invoker
        unload it. With ``if_idle`` only an instance still idle with nothing in flight is
        stopped (a decision taken earlier may be stale by now)."""
        retired = self._table.retire(instance_id, reason, if_idle=if_idle)
        if retired is None:
            return
        live, starting = retired
        if unload and not starting:  # a load in flight is undone when it answers (see load)
            await self.unload(live)
        await self._table.notify()

    async def drain(self, instance_id: str, *, reason: str) -> None:
        """Stop an instance once its invocations in flight end (now, when it has none)."""
        live = self._table.instances.get(instance_id)
        if live is None or live.state in FINAL:
            return
        if live.state == S.PENDING or (live.in_flight == 0 and live.state != S.LOADING):
            await self.stop(instance_id, reason=reason)
        elif live.state != S.DRAINING:
            self._table.set_state(live, S.DRAINING, reason=reason)

    # --- migration ------------------------------------------------------------------------------

    async def move(self, live: LiveInstance, dest: LiveInstance, reserved: int, *, reason: str,
                   limit: int | None = None) -> tuple[MigrateResponse, InstanceRecord]:
        """Move the generations of the migrating ``live`` to ``dest``, which holds ``reserved``
        slots for them (reserved by :mod:`controller.instances.capacity`): wait for ``dest`` to
        load, then have the source's invoker move every generation there by its tokens. The
        gateways follow each stream and move their slots (a release with ``moved_to``).
        Afterwards the source drains (it stops once the last slot moved); when the migration is
        abandoned, or moves at most ``limit`` generations, it goes on serving.

        Returns:
            What the source's invoker reported, and the destination's record.

        Raises:
            MigrationFailed: the destination failed to load or to take the generations.
            SllmError: what the source's invoker answered.
        """
        table, source = self._table, live.record
        try:
            await dest.loaded.wait()
            if dest.error is not None or dest.state not in LOADED:
                why = dest.error.message if dest.error else f"it is {dest.state.value}"
                raise MigrationFailed(f"the destination {dest.record.id} did not load: {why}")
            log.info("migrating %s (%d in flight) from %s to %s on %s: %s", source.id, reserved,
                     source.invoker_id, dest.record.id, dest.record.invoker_id, reason)
            resp = await self._invokers.migrate(
                source.invoker_url, source.id,
                MigrateRequest(to_url=dest.record.invoker_url, to_instance=dest.record.id,
                               limit=limit))
        except BaseException as e:
            table.unhold(dest, reserved)
            if live.state == S.MIGRATING:
                table.set_state(live, S.ACTIVE if live.in_flight else S.IDLE, reason=None)
            await table.notify()
            if isinstance(e, SllmError):
                log.warning("migration of %s abandoned: %s", source.id, e.message)
            raise
        table.unhold(dest, reserved - resp.moved)  # the moved ones' gateways claim theirs
        if live.state == S.MIGRATING:
            if resp.abandoned is not None or limit is not None:
                table.set_state(live, S.ACTIVE if live.in_flight else S.IDLE, reason=None)
            else:
                live.record = live.record.model_copy(update={"migrated_to": dest.record.id})
                await self.drain(source.id, reason=f"migrated to {dest.record.id} "
                                 f"on {dest.record.invoker_id}: {reason}")
        await table.notify()
        return resp, dest.record


def _migration_failure(result: tuple[MigrateResponse, InstanceRecord] | BaseException
                       ) -> str | None:
    """Why a migration made to free room failed (its error, or why it was abandoned), or None
    when it succeeded."""
    if isinstance(result, SllmError):
        return result.message
    if isinstance(result, BaseException):
        return repr(result)
    return result[0].abandoned or None
