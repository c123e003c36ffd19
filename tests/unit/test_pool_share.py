"""Room between functions goes to the oldest waiting call (controller.instances.admission, module docstring):
a call gives way to an older call of another function that waits for room, and a call of a
function with no instance overtakes at most one service time of another function's calls.

One invoker, no migration (the pool has no manifest source), every instance busy with one call
(targetConcurrency 1). The pool has a real etcd but no invoker client: the assertions run
before a placement's background work (sending the load) gets far, and closing the pool cancels
that work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from controller.instances import InstancePool, LiveInstance
from sllm.etcd import Etcd
from sllm.manifest import FunctionManifest
from sllm.messages import Assignment, InvokerRecord
from sllm.states import InstanceState as S
from tests.helpers.cluster import manifest
from tests.helpers.pools import GIB, SilentInvokers, add, invoker


def fn(name: str, max_instances: int) -> FunctionManifest:
    return FunctionManifest.model_validate(manifest(
        name, f"{name}m", resources={"memory": "1Gi"},
        scaling={"maxInstances": max_instances, "targetConcurrency": 1}))


def pool_with(etcd: Etcd, memory_gib: int, busy: dict[str, str]) -> InstancePool:
    """A pool over one invoker of ``memory_gib`` GiB running ``busy`` (instance id -> function),
    each instance 1 GiB with one call in flight."""
    invokers = [invoker("a", memory=memory_gib * GIB)]

    async def list_invokers() -> list[InvokerRecord]:
        return invokers

    pool = InstancePool(etcd, SilentInvokers(), list_invokers, lambda model: GIB)
    for iid, function in busy.items():
        add(pool, iid, function, f"{function}m", "a", in_flight=1)
    return pool


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in 1 s")


def instances_of(pool: InstancePool, function: str) -> list[LiveInstance]:
    return [i for i in pool.table.instances.values()
            if i.record.function == function and i.state not in (S.STOPPED, S.LOST)]


async def test_an_idle_instance_is_left_to_an_older_call_that_found_no_room(etcd: Etcd) -> None:
    """g's call found no room (g-1 busy, the invoker full) and waits. f-1 finishes its call;
    a later call of f does not take it (f still has f-2): it waits, and g's placement unloads
    f-1 for g's new instance."""
    pool = pool_with(etcd, 3, {"f-1": "f", "f-2": "f", "g-1": "g"})
    calls: list[asyncio.Task[Assignment]] = []
    try:
        calls.append(asyncio.create_task(pool.admission.acquire(fn("g", 3), deadline_s=5)))
        await until(lambda: pool.admission.waiting("g") == 1)
        f1 = pool.table.instances["f-1"]
        f1.in_flight = 0  # f-1's call ended; its release has not woken g's call yet
        f1.record = f1.record.model_copy(update={"state": S.IDLE})
        calls.append(asyncio.create_task(pool.admission.acquire(fn("f", 3), deadline_s=5)))
        await until(lambda: pool.admission.waiting("f") == 1)
        assert f1.state == S.IDLE and f1.in_flight == 0  # left to g
        await pool.table.notify()  # what the release does next
        await until(lambda: len(instances_of(pool, "g")) == 2)
        assert f1.state == S.STOPPED and "for g" in (f1.record.reason or "")
        assert pool.admission.waiting("f") == 1
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await pool.close()


@pytest.mark.parametrize("service_s", [0.05, 30.0])
async def test_a_function_with_no_instance_overtakes_one_service_time_of_calls(
        etcd: Etcd, service_s: float) -> None:
    """f runs two calls at its maxInstances and has a third waiting; 0.2 s later a call of n
    (no instance) finds no room and waits. f-1's call ends. When f's calls take 0.05 s, n's
    call came more than one of them after f's waiting call: f's call takes f-1. When they
    take 30 s, n's call goes first: f-1 is left to it and unloaded for n's instance."""
    pool = pool_with(etcd, 2, {"f-1": "f", "f-2": "f"})
    pool.admission.service.observe("f", service_s)
    calls: list[asyncio.Task[Assignment]] = []
    try:
        f_call = asyncio.create_task(pool.admission.acquire(fn("f", 2), deadline_s=5))
        calls.append(f_call)
        await until(lambda: pool.admission.waiting("f") == 1)
        await asyncio.sleep(0.2)
        calls.append(asyncio.create_task(pool.admission.acquire(fn("n", 1), deadline_s=5)))
        await until(lambda: pool.admission.waiting("n") == 1)
        await pool.admission.release("f-1")
        f1 = pool.table.instances["f-1"]
        if service_s < 0.2:
            assignment = await asyncio.wait_for(f_call, 1)
            assert assignment.instance_id == "f-1" and not assignment.cold
            assert f1.state == S.ACTIVE and pool.admission.waiting("n") == 1
        else:
            await until(lambda: len(instances_of(pool, "n")) == 1)
            assert f1.state == S.STOPPED and "for n" in (f1.record.reason or "")
            assert not f_call.done() and pool.admission.waiting("f") == 1
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await pool.close()


async def test_a_call_that_prefers_an_instance_with_a_free_slot_takes_it(etcd: Etcd) -> None:
    """Two instances of f with room: a call goes to the least busy (f-2), one that prefers f-1
    (the other choices of an n > 1 request) to f-1; once f-1 is full, a preferring call takes
    the least busy again."""
    manifest_f = FunctionManifest.model_validate(manifest(
        "f", "fm", resources={"memory": "1Gi"}, scaling={"maxInstances": 2, "targetConcurrency": 3}))
    pool = pool_with(etcd, 4, {})
    f1 = add(pool, "f-1", "f", "fm", "a", in_flight=2)
    f2 = add(pool, "f-2", "f", "fm", "a", in_flight=0)
    try:
        assert (await pool.admission.acquire(manifest_f)).instance_id == "f-2"
        assert (await pool.admission.acquire(manifest_f, prefer="f-1")).instance_id == "f-1"
        assert (f1.in_flight, f2.in_flight) == (3, 1)
        assert (await pool.admission.acquire(manifest_f, prefer="f-1")).instance_id == "f-2"
    finally:
        await pool.close()
