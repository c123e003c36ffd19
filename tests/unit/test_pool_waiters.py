"""The instance pool's waiters (controller.instances.admission.Admission.acquire) when no invoker has room:
one placement per change, not one per waiter. The pool is built without an etcd client or an
invoker client: a placement that finds no room touches neither."""

from __future__ import annotations

import asyncio

import pytest

from controller.instances import InstancePool, LiveInstance
from sllm.errors import Unavailable
from sllm.manifest import FunctionManifest
from sllm.messages import InvokerRecord
from sllm.states import InstanceState as S
from tests.helpers.cluster import manifest
from tests.helpers.pools import GIB, SilentInvokers, add, invoker, no_invokers


async def test_waiters_of_a_function_that_found_no_room_do_not_all_place_again() -> None:
    """Invoker a is full of a busy instance of g. Five calls of f wait: each release of g's
    slots wakes them all, but only the first lists the invokers and decides again; the others
    take its "no room" until something changes or NO_ROOM_RECHECK_S passes."""
    listed = 0

    async def list_invokers() -> list[InvokerRecord]:
        nonlocal listed
        listed += 1
        return [invoker("a", memory=2 * GIB)]

    pool = InstancePool(None, SilentInvokers(), list_invokers, lambda model: GIB)
    add(pool, "g-1", "g", "other", "a", memory=2 * GIB, in_flight=10)
    f = FunctionManifest.model_validate(manifest(
        "f", "m", resources={"memory": "1Gi"}, scaling={"maxInstances": 5}))
    calls = [asyncio.create_task(pool.admission.acquire(f, deadline_s=1.6)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert pool.admission.waiting("f") == 5 and listed == 1
    for n in range(3):
        await pool.admission.release("g-1")  # g still runs 9, 8, 7 calls: no room yet
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

    pool = InstancePool(None, SilentInvokers(), list_invokers, lambda model: GIB)
    add(pool, "f-1", "f", "m", "a", in_flight=1)
    f = FunctionManifest.model_validate(manifest(
        "f", "m", resources={"memory": "1Gi"},
        scaling={"maxInstances": 2, "targetConcurrency": 1}))
    call = asyncio.create_task(pool.admission.acquire(f, deadline_s=5))
    await listing.wait()
    await pool.admission.release("f-1")
    listed.set()
    assignment = await call
    assert assignment.instance_id == "f-1" and not assignment.cold
    assert list(pool.table.instances) == ["f-1"] and pool.table.instances["f-1"].state == S.ACTIVE


def _busy_and_loading() -> tuple[InstancePool, FunctionManifest, LiveInstance]:
    """A pool with two instances of f (targetConcurrency 1, maxInstances 2): f-1 loaded on
    invoker a with one call in flight, f-2 still loading on b (returned)."""
    pool = InstancePool(None, SilentInvokers(), no_invokers, lambda model: GIB)
    add(pool, "f-1", "f", "m", "a", in_flight=1)
    loading = add(pool, "f-2", "f", "m", "b", S.LOADING)
    f = FunctionManifest.model_validate(manifest(
        "f", "m", resources={"memory": "1Gi"},
        scaling={"maxInstances": 2, "targetConcurrency": 1}))
    return pool, f, loading


async def test_a_call_waiting_for_a_load_takes_a_slot_a_loaded_instance_frees_first() -> None:
    """f-1 is loaded and busy (targetConcurrency 1); f-2 is still loading. A new call of f
    joins f-2's cold start, then f-1's call ends before f-2 has loaded: the call takes f-1, a
    warm start after a wait, and gives its slot on f-2 back; f-2's load goes on."""
    pool, f, loading = _busy_and_loading()
    call = asyncio.create_task(pool.admission.acquire(f, deadline_s=5))
    await asyncio.sleep(0.05)
    assert loading.in_flight == 1 and not call.done()  # joined f-2's cold start
    await pool.admission.release("f-1")
    assignment = await asyncio.wait_for(call, 1.0)
    assert assignment.instance_id == "f-1" and not assignment.cold
    assert assignment.queue_seconds >= 0.05 and assignment.load_seconds == 0.0
    assert loading.in_flight == 0 and pool.table.instances["f-2"].state == S.LOADING


async def test_a_call_waiting_for_a_load_takes_that_instance_when_it_loads_first() -> None:
    """As above, but f-2 loads while f-1 is still busy: the call takes f-2, a cold start."""
    pool, f, loading = _busy_and_loading()
    call = asyncio.create_task(pool.admission.acquire(f, deadline_s=5))
    await asyncio.sleep(0.05)
    pool.table.set_state(loading, S.IDLE)
    loading.loaded.set()  # as the pool's load does at its end
    await pool.table.notify()
    assignment = await asyncio.wait_for(call, 0.5)
    assert assignment.instance_id == "f-2" and assignment.cold
    assert assignment.load_seconds >= 0.05
    assert loading.in_flight == 1 and pool.table.instances["f-1"].in_flight == 1


async def test_a_call_that_gives_up_waiting_for_a_load_gives_its_slot_back() -> None:
    """A call that joined a cold start and reaches its deadline first gets 503 (Unavailable)
    and leaves the loading instance's slots as they were."""
    pool, f, loading = _busy_and_loading()
    with pytest.raises(Unavailable, match="still loading"):
        await pool.admission.acquire(f, deadline_s=0.2)
    assert loading.in_flight == 0
