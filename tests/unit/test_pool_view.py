"""The instance pool's scheduler view (controller.instances.view): what a migration would
cost, built from the pool's instances. The view is plain data computed in memory: the pool is
built without an etcd client or an invoker client, which the view never touches."""

from __future__ import annotations

import pytest

from controller.instances import InstancePool
from sllm.states import InstanceState as S
from tests.helpers.pools import GIB, SilentInvokers, add, invoker, no_invokers

NOW = 1000.0


def test_a_busy_instances_move_counts_the_load_where_its_destination_would_start() -> None:
    """Invoker a runs ``f`` (1 GiB checkpoint); b holds that checkpoint on SSD but is full, so a
    destination would start on c with a copy of it (network 1 s + SSD 0.5 s), not read b's SSD
    (0.5 s). With an idle instance of ``f`` on c, the destination is loaded already."""
    pool = InstancePool(None, SilentInvokers(), no_invokers, lambda model: GIB, clock=lambda: NOW)
    invokers = [invoker("a"), invoker("b"), invoker("c")]
    pool.table.tiers = {"big": {"a": "dram", "b": "ssd"}}
    add(pool, "f-1", "f", "big", "a", S.ACTIVE, in_flight=1)
    add(pool, "g-1", "g", "other", "b", S.ACTIVE, memory=2 * GIB, in_flight=1)
    view = pool.capacity.view(invokers, "new")
    assert view.invokers["a"].slots["f-1"].kind == "busy"
    assert view.invokers["a"].slots["f-1"].move_s == pytest.approx(1.5)
    assert view.invokers["a"].busy_move_s == pytest.approx(1.5)

    pool.table.instances["g-1"].record = pool.table.instances["g-1"].record.model_copy(
        update={"memory_bytes": GIB})  # b has room now: its SSD copy is the destination's
    assert pool.capacity.view(invokers, "new").invokers["a"].slots["f-1"].move_s == pytest.approx(0.5)

    add(pool, "f-2", "f", "big", "c", S.IDLE)
    view = pool.capacity.view(invokers, "new")
    assert view.invokers["a"].slots["f-1"].move_s == 0.0
    assert view.invokers["c"].slots["f-2"].kind == "idle"
    # the busy instances of the model being placed never move for it
    assert pool.capacity.view(invokers, "big").invokers["a"].slots["f-1"].kind == "pinned"


def test_a_starting_instance_tells_placement_which_checkpoint_it_loads() -> None:
    """A pending or loading instance's slot names its model and its estimated end, so that a
    second load of that checkpoint on the invoker is estimated as joining it."""
    pool = InstancePool(None, SilentInvokers(), no_invokers, lambda model: GIB, clock=lambda: NOW)
    add(pool, "f-1", "f", "big", "a", S.LOADING)
    pool.table.instances["f-1"].record = pool.table.instances["f-1"].record.model_copy(
        update={"ready_by": NOW + 2.0})
    add(pool, "g-1", "g", "small", "a", S.PENDING)
    view = pool.capacity.view([invoker("a")], "big")
    assert view.invokers["a"].loading == {"big": NOW + 2.0, "small": 0.0}
    assert view.invokers["a"].starting == 2


def test_a_migrations_destination_is_never_moved_itself() -> None:
    """An instance holding slots for generations migrating to it (here an idle one taken as
    the destination) is pinned: a placement that moved it would send those generations after
    it, into an instance that is draining."""
    pool = InstancePool(None, SilentInvokers(), no_invokers, lambda model: GIB, clock=lambda: NOW)
    add(pool, "f-1", "f", "big", "a", S.ACTIVE, in_flight=1)
    assert pool.capacity.view([invoker("a")], "new").invokers["a"].slots["f-1"].kind == "busy"
    pool.table.instances["f-1"].reserved = 1  # its one slot is held for a generation on its way
    assert pool.capacity.view([invoker("a")], "new").invokers["a"].slots["f-1"].kind == "pinned"
