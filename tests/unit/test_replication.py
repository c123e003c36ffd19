"""Burst-ready replication's rule (controller.replication.plan) on hand-made cluster states, and
what the replicator counts from the pool's instances (which invokers are loading, which
functions are in use). The copies themselves run against real invokers in
tests/e2e/test_e2e_replication.py."""

from __future__ import annotations

import asyncio

from controller.instances import InstancePool
from controller.replication import CALM_S, Replicator, plan
from sllm.manifest import FunctionManifest
from sllm.messages import InvokerRecord
from sllm.states import InstanceState as S
from tests.helpers.pools import SilentInvokers, add, no_invokers

MI = 1 << 20


def url(inv_id: str) -> str:
    """An address where nothing listens (port 1 of loopback): a copy sent there fails at once."""
    return f"http://127.0.0.1:1/{inv_id}"


def invoker(inv_id: str, memory_mib: int = 600) -> InvokerRecord:
    return InvokerRecord(id=inv_id, url=url(inv_id), device="cpu",
                         memory_bytes=memory_mib * MI, started=0.0, pid=1)


def function(name: str, model: str, *, max_instances: int = 6, memory: str = "256Mi"
             ) -> FunctionManifest:
    return FunctionManifest.model_validate({
        "apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
        "spec": {"model": model, "resources": {"memory": memory},
                 "scaling": {"maxInstances": max_instances}},
    })


INVOKERS = [invoker("a"), invoker("b"), invoker("c", 300)]  # a, b host 2 of 256 MiB; c hosts 1


def test_an_in_use_function_is_copied_until_its_holders_can_host_max_instances() -> None:
    f = function("f", "m")  # maxInstances 6
    (c,) = plan([f], {"f": 1}, {"m": {"c": "dram"}}, INVOKERS)
    # c hosts 1 instance; the copy goes where most instances fit (a and b: 2; by id, b)
    assert (c.model, c.invoker_id, c.url, c.hosts) == ("m", "b", url("b"), 1)
    assert c.sources == (url("c"),)
    (c,) = plan([f], {"f": 1}, {"m": {"c": "ssd", "b": "ssd"}}, INVOKERS)
    assert c.invoker_id == "a" and c.hosts == 3
    # every invoker holds it: nothing more to do, although 5 < 6
    assert plan([f], {"f": 1}, {"m": {"a": "ssd", "b": "ssd", "c": "ssd"}}, INVOKERS) == []


def test_holders_that_host_max_instances_already_and_unused_functions_get_no_copy() -> None:
    tiers = {"m": {"a": "ssd"}, "n": {"a": "ssd"}}
    two = function("f", "m", max_instances=2)  # a hosts 2 already
    idle = function("g", "n")  # no loaded instance: not in use
    assert plan([two, idle], {"f": 3, "g": 0}, tiers, INVOKERS) == []
    # an instance needing more memory than c has is never copied there
    big = function("h", "m", memory="400Mi", max_instances=3)
    (c,) = plan([big], {"h": 1}, {"m": {"a": "ssd"}}, INVOKERS)
    assert c.invoker_id == "b"
    assert plan([big], {"h": 1}, {"m": {"a": "ssd", "b": "ssd"}}, INVOKERS) == []


def test_sources_are_live_holders_dram_tier_first() -> None:
    tiers = {"m": {"a": "ssd", "b": "dram", "gone": "dram"}}  # "gone" is no live invoker
    (c,) = plan([function("f", "m")], {"f": 1}, tiers, INVOKERS)
    assert c.invoker_id == "c" and c.sources == (url("b"), url("a")) and c.hosts == 4


def test_busy_invokers_failed_pairs_and_the_limit_hold_copies_back() -> None:
    f, g, h = function("f", "m"), function("g", "n"), function("h", "o")
    tiers = {"m": {"c": "ssd"}, "n": {"c": "ssd"}, "o": {"c": "ssd"}}
    loaded = {"f": 1, "g": 3, "h": 2}
    # busier functions first; one copy per receiving invoker: g -> b, h -> a, f waits
    got = plan([f, g, h], loaded, tiers, INVOKERS)
    assert [(c.function, c.invoker_id) for c in got] == [("g", "b"), ("h", "a")]
    assert [c.function for c in plan([f, g, h], loaded, tiers, INVOKERS, limit=1)] == ["g"]
    # b is loading an instance: g's copy goes to a, and then no invoker is left for h
    got = plan([f, g, h], loaded, tiers, INVOKERS, busy={"b"})
    assert [(c.function, c.invoker_id) for c in got] == [("g", "a")]
    got = plan([f, g, h], loaded, tiers, INVOKERS, skip={("n", "b"), ("n", "a")})
    assert [(c.function, c.invoker_id) for c in got] == [("h", "b"), ("f", "a")]


def test_two_functions_of_one_model_make_one_copy_at_a_time() -> None:
    got = plan([function("f", "m"), function("g", "m")], {"f": 1, "g": 1}, {"m": {"a": "ssd"}},
               INVOKERS)
    assert [(c.function, c.invoker_id) for c in got] == [("f", "b")]


async def test_the_replicator_copies_in_calm_periods_only() -> None:
    """Only loaded instances make a function in use; an invoker with a starting instance gets
    no copy (its disk and network serve that cold start), and nothing starts while a call
    waits for an instance. The copies planned are started as tasks (they fail here: nothing
    listens at these URLs) and are then not retried for a while."""
    from controller.invoker_client import InvokerClient

    pool = InstancePool(None, SilentInvokers(), no_invokers, lambda model: MI, clock=lambda: 0.0)
    pool.table.tiers = {"m": {"a": "ssd"}, "n": {"a": "ssd"}}
    add(pool, "f-1", "f", "m", "a", S.ACTIVE, memory=256 * MI)
    add(pool, "g-1", "g", "n", "b", S.LOADING, memory=256 * MI)  # g is not in use yet; b is loading
    functions = {"f": function("f", "m"), "g": function("g", "n")}
    client = InvokerClient()
    now = [0.0]
    rep = Replicator(client, pool, clock=lambda: now[0])
    try:
        got = rep.tick(INVOKERS, functions)
        assert [(c.function, c.invoker_id) for c in got] == [("f", "c")]
        assert set(rep.running) == {("m", "c")}
        assert rep.tick(INVOKERS, functions) == []  # c is receiving a copy already
        for task in list(rep.running.values()):
            await task
        assert rep.running == {} and rep.made == 0  # unreachable: failed, not recorded
        assert "c" not in pool.table.tiers["m"]
        assert rep.tick(INVOKERS, functions) == []  # not retried at once
        now[0] = 61.0
        pool.admission.waiting_since["f"] = [0.0]  # an invocation waits for an instance (as acquire lists it)
        assert pool.admission.queued() == 1 and rep.tick(INVOKERS, functions) == []  # not calm
        del pool.admission.waiting_since["f"]
        now[0] += CALM_S - 0.1
        assert rep.tick(INVOKERS, functions) == []  # calm for less than CALM_S
        now[0] += 0.1
        assert [c.invoker_id for c in rep.tick(INVOKERS, functions)] == ["c"]
        await rep.close()
    finally:
        await client.close()


async def test_a_waiting_invocation_pauses_the_copies_running_once_each() -> None:
    """The pool tells the replicator the moment an invocation starts waiting; each copy
    running is then asked to pause once (here the request fails: nothing listens), and no
    copy starts until CALM_S seconds later. Closing the replicator unhooks it."""
    from controller.invoker_client import InvokerClient

    pool = InstancePool(None, SilentInvokers(), no_invokers, lambda model: MI, clock=lambda: 0.0)
    pool.table.tiers = {"m": {"a": "ssd"}}
    add(pool, "f-1", "f", "m", "a", S.ACTIVE, memory=256 * MI)
    functions = {"f": function("f", "m")}
    client = InvokerClient()
    now = [100.0]
    rep = Replicator(client, pool, clock=lambda: now[0])
    try:
        assert pool.admission.on_queue == rep.pause
        (c,) = rep.tick(INVOKERS, functions)
        pool.admission.on_queue()  # as acquire does when a call starts waiting
        assert rep._pausing == {(c.model, c.invoker_id)} and len(rep._pauses) == 1
        rep.pause()  # asked once only
        assert len(rep._pauses) == 1
        await asyncio.gather(*rep.running.values(), *rep._pauses)
        now[0] += CALM_S - 0.1
        assert rep.tick(INVOKERS, functions) == []  # not calm yet
    finally:
        await rep.close()
        await client.close()
    assert pool.admission.on_queue is None
