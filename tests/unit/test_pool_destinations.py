"""A placement that moves a running instance away reserves the moved instance's destination in
the same step (controller.instances.capacity.Capacity.start_instance): before the call returns, and so
before any other placement can run, the destination exists and holds the mover's slots.

The pool has a real etcd but no invoker client: the assertions run before the call's background
work (sending the loads) gets a turn, and closing the pool cancels that work."""

from __future__ import annotations

import asyncio

import pytest

from controller.instances import InstancePool, LiveInstance
from sllm.errors import FunctionNotFound, Unavailable
from sllm.etcd import Etcd
from sllm.manifest import FunctionManifest
from sllm.messages import InvokerRecord
from sllm.states import InstanceState as S
from tests.helpers.cluster import manifest
from tests.helpers.pools import GIB, SilentInvokers, add, invoker

NOW = 1000.0


def fn(name: str, model: str) -> FunctionManifest:
    return FunctionManifest.model_validate({
        "apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
        "spec": {"model": model, "resources": {"memory": "1Gi"},
                 "generation": {"maxTokens": 100}},
    })


def cluster(etcd: Etcd, known: dict[str, FunctionManifest]
            ) -> tuple[InstancePool, list[InvokerRecord]]:
    """Invoker a (2 GiB) runs g-1 (1 call in flight) and h-1 (4 calls); b (2 GiB) runs k-1 and
    has 1 GiB free. f's 8 GiB checkpoint is in a's DRAM tier: on a it loads in 0.8 s once g-1
    (the fewest tokens) moved to b (about 1.5 s for g's copy and read there); on b it would
    be copied first (8 s + 4 s)."""
    invokers = [invoker("a"), invoker("b")]

    async def list_invokers() -> list[InvokerRecord]:
        return invokers

    async def manifest_of(function: str) -> FunctionManifest:
        if function not in known:
            raise FunctionNotFound(f"no function {function!r}")
        return known[function]

    sizes = {"fm": 8 * GIB}
    pool = InstancePool(etcd, SilentInvokers(), list_invokers, lambda model: sizes.get(model, GIB),
                        manifest_of=manifest_of, clock=lambda: NOW)
    pool.table.tiers = {"fm": {"a": "dram"}}
    add(pool, "g-1", "g", "gm", "a", in_flight=1)
    add(pool, "h-1", "h", "hm", "a", in_flight=4)
    add(pool, "k-1", "k", "km", "b", in_flight=1)
    return pool, invokers


def others_of(pool: InstancePool, function: str, but: str) -> list[LiveInstance]:
    return [i for i in pool.table.instances.values()
            if i.record.function == function and i.record.id != but]


async def test_a_moved_instances_destination_holds_its_room_when_the_decision_returns(
        etcd: Etcd) -> None:
    pool, invokers = cluster(etcd, {"g": fn("g", "gm")})
    try:
        live = await pool.capacity.start_instance(fn("f", "fm"), reserve=True)
        assert live is not None and live.record.invoker_id == "a"
        assert live.record.placement is not None and live.record.placement.migrate == ["g-1"]
        assert pool.table.instances["g-1"].state == S.MIGRATING
        [dest] = others_of(pool, "g", but="g-1")
        assert dest.record.invoker_id == "b" and dest.state == S.PENDING
        assert dest.in_flight == 1 and dest.reserved == 1  # g-1's call moves into this slot
        assert len(live.after) == 1  # f's load waits for that migration
        # another function's placement, next: b's free GiB is the destination's now
        assert pool.capacity.decide(fn("q", "qm"), invokers, may_migrate=False) is None
    finally:
        await pool.close()


async def test_a_mover_with_nowhere_to_go_leaves_the_best_place_without_migration(
        etcd: Etcd) -> None:
    """g's manifest is gone (deleted meanwhile): g-1 cannot get a destination, so f takes b
    (the copy), and nothing is left reserved or marked migrating."""
    pool, _ = cluster(etcd, {})
    try:
        live = await pool.capacity.start_instance(fn("f", "fm"), reserve=True)
        assert live is not None and live.record.invoker_id == "b"
        placement = live.record.placement
        assert placement is not None and placement.migrate == []
        # the estimate that needed the migration is kept with the decision
        assert any(c.invoker_id == "a" and c.migrates for c in placement.candidates)
        assert pool.table.instances["g-1"].state == S.ACTIVE
        assert others_of(pool, "g", but="g-1") == [] and live.after == []
    finally:
        await pool.close()


async def test_preempt_mode_unloads_the_movers_and_reserves_nothing(etcd: Etcd) -> None:
    pool, _ = cluster(etcd, {"g": fn("g", "gm")})
    pool.capacity.mode = "preempt"
    try:
        live = await pool.capacity.start_instance(fn("f", "fm"), reserve=True)
        assert live is not None and live.record.invoker_id == "a"
        assert "g-1" not in pool.table.instances and others_of(pool, "g", but="g-1") == []
        assert live.after == []
    finally:
        await pool.close()


async def test_no_instance_is_moved_away_while_a_call_waits_for_capacity(etcd: Etcd) -> None:
    """A call of h waits (h-1 runs its 4 calls at h's maxInstances 1). f's best place is
    still a by moving g-1 away, but a moved instance's load and recompute would take capacity
    from the calls in flight and the one waiting: f takes b (the copy) and g-1 keeps running.
    Once the call stops waiting, f's next placement moves g-1 again."""
    pool, _ = cluster(etcd, {"g": fn("g", "gm")})
    h = FunctionManifest.model_validate(manifest(
        "h", "hm", resources={"memory": "1Gi"},
        scaling={"maxInstances": 1, "targetConcurrency": 4}))
    try:
        call = asyncio.create_task(pool.admission.acquire(h, deadline_s=0.3))
        await asyncio.sleep(0.05)
        assert pool.admission.waiting("h") == 1
        live = await pool.capacity.start_instance(fn("f", "fm"), reserve=True)
        assert live is not None and live.record.invoker_id == "b"
        placement = live.record.placement
        assert placement is not None and placement.migrate == []
        assert any(c.invoker_id == "a" and c.migrates for c in placement.candidates)
        assert pool.table.instances["g-1"].state == S.ACTIVE and live.after == []
        with pytest.raises(Unavailable):
            await call
        assert pool.admission.queued() == 0
        pool.table.retire(live.record.id, "placed again below")  # b's GiB is free again
        again = await pool.capacity.start_instance(fn("f", "fm"), reserve=True)
        assert again is not None and again.record.invoker_id == "a"
        assert pool.table.instances["g-1"].state == S.MIGRATING
    finally:
        await pool.close()
