"""The instance pool's waiters (controller.pool.InstancePool.acquire) when no invoker has room:
one placement per change, not one per waiter. The pool is built without an etcd client or an
invoker client: a placement that finds no room touches neither."""

from __future__ import annotations

import asyncio

import pytest

from controller.pool import InstancePool
from sllm.errors import Unavailable
from sllm.manifest import FunctionManifest
from sllm.messages import InvokerRecord
from sllm.states import InstanceState as S
from tests.conftest import manifest
from tests.pools import GIB, add, invoker


async def test_waiters_of_a_function_that_found_no_room_do_not_all_place_again() -> None:
    """Invoker a is full of a busy instance of g. Five calls of f wait: each release of g's
    slots wakes them all, but only the first lists the invokers and decides again; the others
    take its "no room" until something changes or NO_ROOM_RECHECK_S passes."""
    listed = 0

    async def list_invokers() -> list[InvokerRecord]:
        nonlocal listed
        listed += 1
        return [invoker("a", memory=2 * GIB)]

    pool = InstancePool(None, None, list_invokers, lambda model: GIB)  # type: ignore[arg-type]
    add(pool, "g-1", "g", "other", "a", memory=2 * GIB, in_flight=10)
    f = FunctionManifest.model_validate(manifest(
        "f", "m", resources={"memory": "1Gi"}, scaling={"maxInstances": 5}))
    calls = [asyncio.create_task(pool.acquire(f, deadline_s=1.6)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert pool.waiting("f") == 5 and listed == 1
    for n in range(3):
        await pool.release("g-1")  # g still runs 9, 8, 7 calls: no room yet
        await asyncio.sleep(0.02)
        assert listed == 2 + n
    await asyncio.sleep(1.1)  # every waiter's bounded wait ends, past the recheck bound
    assert listed == 5
    for call in calls:
        with pytest.raises(Unavailable):
            await call


async def test_a_slot_freed_while_placing_is_taken_warm_not_unloaded_for_a_new_instance() -> None:
    """Invoker a holds only f-1, busy with one call (targetConcurrency 1). A second call of f
    starts a placement; while it lists the invokers, f-1's call ends. The placement would
    unload f-1 as the least recently used idle instance and start another f in its place: the
    call takes f-1 instead, a warm start."""
    listing = asyncio.Event()
    listed = asyncio.Event()

    async def list_invokers() -> list[InvokerRecord]:
        listing.set()
        await listed.wait()
        return [invoker("a", memory=GIB)]

    pool = InstancePool(None, None, list_invokers, lambda model: GIB)  # type: ignore[arg-type]
    add(pool, "f-1", "f", "m", "a", in_flight=1)
    f = FunctionManifest.model_validate(manifest(
        "f", "m", resources={"memory": "1Gi"},
        scaling={"maxInstances": 2, "targetConcurrency": 1}))
    call = asyncio.create_task(pool.acquire(f, deadline_s=5))
    await listing.wait()
    await pool.release("f-1")
    listed.set()
    assignment = await call
    assert assignment.instance_id == "f-1" and not assignment.cold
    assert list(pool.instances) == ["f-1"] and pool.instances["f-1"].state == S.ACTIVE
