"""The placement view: the scheduler's picture (:class:`controller.placement.ClusterView`) of the
live invokers and the table's instances, built in memory for one decision.

Each instance becomes a slot on its invoker: ``starting`` (its load ends at ``ready_by``; a load
of the same checkpoint joins it), ``idle`` (may be unloaded, least recently used first),
``busy`` (may be migrated away: its tokens are what a migration recomputes, and its ``move_s``
the time its destination needs to load first, ServerlessLLM §6), or ``pinned`` (neither: it
starts, migrates or drains already, holds slots for generations migrating to it, or serves the
model being placed, which moving would not help).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from controller.instances.health import InvokerHealth
from controller.instances.table import InstanceTable, LiveInstance
from controller.placement import (
    ClusterView,
    InvokerState,
    Slot,
    bandwidths_of,
    destination_estimates,
)
from sllm.errors import SllmError
from sllm.messages import InvokerRecord
from sllm.states import FINAL, LOADED, STARTING, InstanceState

S = InstanceState


def build_view(table: InstanceTable, health: InvokerHealth, invokers: Iterable[InvokerRecord],
               model: str | None, model_bytes: Callable[[str], int]) -> ClusterView:
    """The view of the live, unsuspected ``invokers`` and the table's instances, for placing an
    instance of ``model`` (its busy instances are pinned: never moved for it). Also records
    the invokers' URLs in ``table.urls`` (the sources a load may fetch from).

    Args:
        model_bytes: a model's checkpoint size in the store root (bytes), asked only for a
            busy instance adopted from an earlier controller, whose size is not known yet.
    """
    view = ClusterView(tiers=table.tiers)
    now = table.clock()
    table.urls = {}
    for rec in invokers:
        if health.suspected(rec, now):
            continue  # found unreachable, and its lease has not expired yet
        table.urls[rec.id] = rec.url
        view.invokers[rec.id] = InvokerState(
            id=rec.id, url=rec.url, memory_bytes=rec.memory_bytes,
            bandwidths=bandwidths_of(rec.bandwidths),
        )
    busy: list[tuple[LiveInstance, InvokerState, Slot]] = []
    idle_at: dict[str, set[str]] = {}  # function -> invoker ids with an idle instance of it
    for live in table.instances.values():
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
            slot, move_s=_move_seconds(live, inv, view, dest, idle_at, now, model_bytes)))
    return view


def _move_seconds(live: LiveInstance, inv: InvokerState, view: ClusterView,
                  dest: dict[tuple[str, int], list[tuple[float, str]]],
                  idle_at: dict[str, set[str]], now: float,
                  model_bytes: Callable[[str], int]) -> float:
    """Estimated seconds until a migration destination for the busy ``live`` is loaded, as
    capacity finds one: 0 when its function has an idle instance on another invoker, else the
    best startup estimate on another invoker with room
    (:func:`controller.placement.destination_estimates`, kept in ``dest`` per model and memory
    for this view). With no room anywhere, a copy from the store root at ``inv``'s bandwidth
    (placement then finds nowhere for it to go anyway). The checkpoint's size comes from the
    instance's load, so a decision does no I/O per busy instance."""
    rec = live.record
    if idle_at.get(rec.function, set()) - {rec.invoker_id}:
        return 0.0
    if not live.nbytes:  # adopted from an earlier controller: ask the store root, once
        try:
            live.nbytes = model_bytes(rec.model)
        except SllmError:
            return 0.0
    key = (rec.model, rec.memory_bytes)
    if key not in dest:
        dest[key] = destination_estimates(view, rec.model, live.nbytes, rec.memory_bytes, now=now)
    return next((s for s, i in dest[key] if i != rec.invoker_id),
                live.nbytes * inv.seconds_per_byte[2])
