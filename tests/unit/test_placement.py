"""Placement (controller.placement): the policies against hand-built cluster views."""

from __future__ import annotations

import random

import pytest

from controller.estimator import Bandwidths, MigrationCost
from controller.placement import (
    ClusterView,
    InvokerState,
    PlacementRequest,
    Slot,
    destination_estimates,
    place,
)

GB = 10**9
BW = Bandwidths(dram_bps=10 * GB, ssd_bps=2 * GB, network_bps=1 * GB)
MIG = MigrationCost(per_token_s=0.001, fixed_s=0.1)


def cluster(*specs: tuple[str, int], tiers: dict[str, str] | None = None) -> ClusterView:
    """Invokers ``(id, memory bytes)``; ``tiers``: invoker -> tier of model ``m``."""
    view = ClusterView()
    for inv_id, mem in specs:
        view.invokers[inv_id] = InvokerState(id=inv_id, url=f"http://{inv_id}", memory_bytes=mem,
                                             bandwidths=BW)
    for inv_id, tier in (tiers or {}).items():
        view.set_tier("m", inv_id, tier)  # type: ignore[arg-type]
    return view


REQ = PlacementRequest(model="m", nbytes=GB, memory_bytes=GB)


def test_worked_example() -> None:
    """The module docstring's example."""
    view = cluster(("a", GB), ("b", 2 * GB), ("c", 2 * GB), tiers={"a": "dram", "b": "ssd"})
    view.invokers["a"].put("busy-1", Slot(GB, "busy", tokens=500))
    p = place(view, REQ, policy="ours", migration=MIG, now=0.0)
    assert p is not None and p.invoker.id == "b" and p.chosen.tier == "ssd"
    assert [(e.invoker_id, round(e.total_s, 6)) for e in p.candidates] == [
        ("b", 0.5), ("a", 0.7), ("c", 1.5)]
    a = next(e for e in p.candidates if e.invoker_id == "a")
    assert a.migrates and a.migration_s == pytest.approx(0.6) and a.load_s == pytest.approx(0.1)
    assert p.migrate == () and p.considered == 3
    loc = place(view, REQ, policy="locality", migration=MIG, now=0.0)
    assert loc is not None and loc.invoker.id == "b"


def test_migration_includes_the_destinations_load_and_pinned_slots_never_move() -> None:
    """Moving a busy instance away costs its recompute (1 ms per token + 0.1 s) plus its
    destination's load (``move_s``), and needs another invoker with room for it; a pinned slot
    (one already migrating, or of the model being placed) is never moved, so an invoker full of
    them is no candidate."""
    view = cluster(("a", GB), ("b", GB), ("c", 2 * GB), tiers={"a": "dram"})
    view.invokers["a"].put("busy-1", Slot(GB, "busy", tokens=500, move_s=0.25))
    view.invokers["b"].put("pinned-1", Slot(GB, "pinned"))
    view.invokers["c"].put("busy-2", Slot(int(1.5 * GB), "busy", tokens=10))  # 0.5 GB free
    assert place(view, REQ, policy="ours", migration=MIG, now=0.0) is None  # nowhere to move to
    view.invokers["c"].drop("busy-2")  # c has room for a's instance, and for the new one
    p = place(view, REQ, policy="ours", migration=MIG, now=0.0)
    # DRAM 0.1 s + migration 0.6 + 0.25 s beats c's copy from the store root (1.5 s)
    assert p is not None and p.invoker.id == "a" and p.migrate == ("busy-1",)
    assert p.chosen.migration_s == pytest.approx(0.6 + 0.25) and p.considered == 2
    view.invokers["a"].drop("busy-1")
    assert view.invokers["a"].busy_move_s == 0 and view.invokers["a"].used_bytes == 0
    view.invokers["a"].put("pinned-2", Slot(GB, "pinned"))
    p = place(view, REQ, policy="ours", migration=MIG, now=0.0)
    assert p is not None and p.invoker.id == "c" and p.considered == 1  # a and b: pinned


def test_a_migration_destination_starts_where_a_new_instance_would() -> None:
    """Where a moved instance's destination loads: the best queue + load among invokers with
    room without migrating (free or idle memory), so a copy counts when no other invoker
    holding the checkpoint has room (a 1 GB checkpoint: DRAM 0.1 s, SSD 0.5 s, a copy: network
    1 s + SSD 0.5 s)."""
    def dest(view: ClusterView, need: int, now: float) -> list[tuple[float, str]]:
        return [(round(s, 9), i) for s, i in destination_estimates(view, "m", GB, need, now=now)]

    view = cluster(("a", GB), ("b", GB), ("c", GB), ("d", GB), tiers={"a": "dram", "b": "ssd"})
    view.invokers["a"].put("busy", Slot(GB, "busy", tokens=10))
    assert dest(view, GB, now=0.0) == [(0.5, "b"), (1.5, "c")]
    view.invokers["b"].put("busy-b", Slot(GB, "busy", tokens=10))  # b: full
    assert dest(view, GB, now=0.0) == [(1.5, "c"), (1.5, "d")]
    view.invokers["c"].put("old", Slot(GB, "idle"))  # unloading an idle instance makes room
    view.invokers["d"].put("loading", Slot(GB // 2, "starting", ready_by=3.0))  # half full
    assert dest(view, GB, now=1.0) == [(1.5, "c")]
    assert dest(view, GB // 2, now=1.0) == [(1.5, "c"), (3.5, "d")]
    view.invokers["c"].put("old", Slot(GB, "busy", tokens=1))
    assert dest(view, GB, now=1.0) == []


def test_prefers_dram_then_ssd_then_remote() -> None:
    view = cluster(("a", 4 * GB), ("b", 4 * GB), ("c", 4 * GB), tiers={"b": "ssd", "c": "dram"})
    for policy in ("ours", "locality"):
        p = place(view, REQ, policy=policy, now=0.0)  # type: ignore[arg-type]
        assert p is not None and (p.invoker.id, p.chosen.tier) == ("c", "dram"), policy
    view.set_tier("m", "c", None)
    p = place(view, REQ, now=0.0)
    assert p is not None and (p.invoker.id, p.chosen.tier) == ("b", "ssd")
    view.set_tier("m", "b", None)
    p = place(view, REQ, now=0.0)
    assert p is not None and p.chosen.tier == "remote"
    assert p.chosen.load_s == pytest.approx(1.0 + 0.5)  # copy at 1 GB/s, then the SSD load


def test_queued_loads_make_ours_look_elsewhere_but_not_locality() -> None:
    """a holds the checkpoint in DRAM but has 2 s of loads queued: ours takes b's SSD copy
    (0.5 s), locality still goes to a."""
    view = cluster(("a", 4 * GB), ("b", 4 * GB), tiers={"a": "dram", "b": "ssd"})
    view.invokers["a"].put("loading-1", Slot(GB, "starting", ready_by=12.0))
    p = place(view, REQ, policy="ours", now=10.0)
    assert p is not None and p.invoker.id == "b"
    a = next(e for e in p.candidates if e.invoker_id == "a")
    assert a.queue_s == pytest.approx(2.0) and a.total_s == pytest.approx(2.1)
    loc = place(view, REQ, policy="locality", now=10.0)
    assert loc is not None and loc.invoker.id == "a"
    # once the queued load is due, a wins again
    p = place(view, REQ, policy="ours", now=13.0)
    assert p is not None and p.invoker.id == "a"


def test_a_load_of_a_checkpoint_already_starting_there_joins_it() -> None:
    """The invoker fetches and reads a checkpoint once: a second instance of ``m`` on a, where
    a copy of ``m`` is starting (due at 1.0), waits for that load only, not for a later load of
    another model (due at 3.0), then maps it from DRAM (0.1 s). Ours then prefers a (1.1 s) to
    a copy onto b (1.5 s); locality ranks by where the checkpoint is now."""
    view = cluster(("a", 4 * GB), ("b", 4 * GB))
    a = view.invokers["a"]
    a.put("m-1", Slot(GB, "starting", ready_by=1.0, model="m"))
    a.put("x-1", Slot(GB, "starting", ready_by=3.0, model="x"))
    p = place(view, REQ, policy="ours", now=0.0)
    assert p is not None and p.invoker.id == "a" and p.chosen.tier == "dram"
    assert p.chosen.queue_s == pytest.approx(1.0) and p.chosen.total_s == pytest.approx(1.1)
    loc = place(view, REQ, policy="locality", now=0.0)
    assert loc is not None
    assert next(e for e in loc.candidates if e.invoker_id == "a").tier == "remote"
    a.put("m-2", Slot(GB, "starting", ready_by=2.0, model="m"))
    a.drop("m-1")  # the later of m's two loads still starting is the one to join
    assert a.loading == {"m": 2.0, "x": 3.0}
    p = place(view, REQ, policy="ours", now=0.0)
    assert p is not None and p.invoker.id == "b" and p.chosen.total_s == pytest.approx(1.5)
    a.drop("m-2")
    assert a.loading == {"x": 3.0}
    p = place(view, REQ, policy="ours", now=0.0)
    a_est = next(e for e in p.candidates if e.invoker_id == "a") if p else None
    assert a_est is not None and a_est.tier == "remote" and a_est.queue_s == pytest.approx(3.0)


def test_idle_instances_are_evicted_least_recently_used_first() -> None:
    view = cluster(("a", 3 * GB), tiers={"a": "ssd"})
    inv = view.invokers["a"]
    inv.put("old", Slot(GB, "idle", last_used=1.0))
    inv.put("new", Slot(GB, "idle", last_used=5.0))
    inv.put("busy", Slot(GB, "busy", tokens=10))
    p = place(view, REQ, now=0.0)
    assert p is not None and p.evict == ("old",) and p.chosen.evicts and not p.chosen.migrates
    p = place(view, PlacementRequest("m", GB, 2 * GB), now=0.0)
    assert p is not None and p.evict == ("old", "new")


def test_migration_only_when_allowed_and_only_ours() -> None:
    # b cannot hold the new instance, but can take the one a must move away
    view = cluster(("a", GB), ("b", int(0.7 * GB)), tiers={"a": "dram"})
    view.invokers["a"].put("busy", Slot(int(0.6 * GB), "busy", tokens=100))
    assert place(view, REQ, now=0.0) is None  # no migration cost given: not a candidate
    for policy in ("locality", "least-loaded", "random"):
        assert place(view, REQ, policy=policy, migration=MIG, now=0.0) is None  # type: ignore[arg-type]
    p = place(view, REQ, migration=MIG, now=0.0)
    assert p is not None and p.migrate == ("busy",)
    assert p.chosen.migration_s == pytest.approx(0.001 * 100 + 0.1)


def test_least_loaded_and_random() -> None:
    view = cluster(("a", 4 * GB), ("b", 4 * GB), ("c", GB // 2), tiers={"a": "dram"})
    view.invokers["a"].in_flight = 3
    p = place(view, REQ, policy="least-loaded", now=0.0)
    assert p is not None and p.invoker.id == "b"  # c cannot hold it
    seen = {place(view, REQ, policy="random", rng=random.Random(s), now=0.0).invoker.id  # type: ignore[union-attr]
            for s in range(40)}
    assert seen == {"a", "b"}


def test_slot_bookkeeping() -> None:
    inv = InvokerState(id="a", url="", memory_bytes=10 * GB, bandwidths=BW)
    inv.put("s", Slot(GB, "starting", ready_by=7.0))
    inv.put("i", Slot(2 * GB, "idle"))
    inv.put("b", Slot(3 * GB, "busy", tokens=9))
    assert (inv.used_bytes, inv.idle_bytes, inv.busy_bytes, inv.busy_tokens, inv.ready_by) == (
        6 * GB, 2 * GB, 3 * GB, 9, 7.0)
    inv.put("i", Slot(2 * GB, "busy", tokens=1))  # replacing a slot moves its bytes
    assert (inv.idle_bytes, inv.busy_bytes, inv.busy_tokens) == (0, 5 * GB, 10)
    inv.drop("s")
    inv.drop("missing")
    assert (inv.used_bytes, inv.starting, inv.ready_by) == (5 * GB, 0, 0.0)


def test_unknown_policy_and_full_cluster() -> None:
    view = cluster(("a", GB // 2))
    assert place(view, REQ, now=0.0) is None
    with pytest.raises(ValueError, match="unknown placement policy"):
        place(view, REQ, policy="best", now=0.0)  # type: ignore[arg-type]


def test_ours_takes_near_equal_estimates_as_a_tie_and_keeps_idle_instances() -> None:
    """a's DRAM tier measured 5% faster, but placing there means unloading an idle instance; b
    (DRAM, room) is within the tie margin, so ours goes to b. A clear gap still decides."""
    view = ClusterView()
    for inv_id, dram in (("a", 10.5 * GB), ("b", 10 * GB)):
        view.invokers[inv_id] = InvokerState(id=inv_id, url="", memory_bytes=2 * GB,
                                             bandwidths=Bandwidths(dram, 2 * GB, GB))
        view.set_tier("m", inv_id, "dram")
    view.invokers["a"].put("idle", Slot(2 * GB, "idle"))
    p = place(view, REQ, now=0.0)
    assert p is not None and p.invoker.id == "b" and p.evict == ()
    assert p.candidates[0].invoker_id == "a"  # the estimates themselves are unchanged
    view.set_tier("m", "b", None)  # b must now copy the checkpoint: 1.5 s against 0.095 s
    p = place(view, REQ, now=0.0)
    assert p is not None and p.invoker.id == "a" and p.evict == ("idle",)


def test_ours_settles_a_tie_on_the_invoker_with_less_work_in_flight() -> None:
    """a and b both hold the checkpoint in DRAM and have room; a measured 5% faster but runs two
    invocations, b none: ours goes to b (instances on one invoker share its compute). Without
    work in flight, a's faster tier wins; a clear gap decides whatever is in flight."""
    view = ClusterView()
    for inv_id, dram in (("a", 10.5 * GB), ("b", 10 * GB)):
        view.invokers[inv_id] = InvokerState(id=inv_id, url="", memory_bytes=4 * GB,
                                             bandwidths=Bandwidths(dram, 2 * GB, GB))
        view.set_tier("m", inv_id, "dram")
    p = place(view, REQ, now=0.0)
    assert p is not None and p.invoker.id == "a"
    view.invokers["a"].in_flight = 2
    p = place(view, REQ, now=0.0)
    assert p is not None and p.invoker.id == "b"
    view.set_tier("m", "b", "ssd")  # b: 0.5 s against a's 0.095 s
    p = place(view, REQ, now=0.0)
    assert p is not None and p.invoker.id == "a"


def test_ours_keeps_the_same_best_candidates_when_it_sets_most_aside() -> None:
    """With many candidates, ``ours`` builds rows only for those that may be among the ``keep``
    best; the decision, its best ``keep`` estimates and ``considered`` must be what a decision
    keeping every candidate starts with. Estimates tie on purpose (equal bandwidths and
    sizes): a tie at the bound of what is kept must be kept, since a later-visited candidate
    with a smaller id sorts first."""
    rng = random.Random(7)
    view = ClusterView()
    ids = list(range(400))
    rng.shuffle(ids)  # visited out of id order, so a later tie can sort first
    for i in ids:
        inv = InvokerState(id=f"i{i:03d}", url="", memory_bytes=rng.choice([2, 3, 4]) * GB,
                           bandwidths=BW)
        view.invokers[inv.id] = inv
        for k in range(rng.randint(0, 3)):
            kind = rng.choice(["idle", "busy", "starting"])
            if inv.used_bytes + GB <= inv.memory_bytes:
                inv.put(f"{i}-{k}", Slot(GB, kind, tokens=rng.randint(10, 900), last_used=k,  # type: ignore[arg-type]
                                         ready_by=rng.uniform(0, 3)))
        if rng.random() < 0.02:  # few holders: the best 16 end among the remote ties
            view.set_tier("m", inv.id, rng.choice(["dram", "ssd"]))  # type: ignore[arg-type]
    req = PlacementRequest(model="m", nbytes=GB, memory_bytes=2 * GB)
    for migration in (MIG, None):
        few = place(view, req, policy="ours", migration=migration, now=1.0, keep=16)
        every = place(view, req, policy="ours", migration=migration, now=1.0, keep=400)
        assert few is not None and every is not None
        assert few.considered == every.considered > 4 * 16  # enough that rows were set aside
        assert few.candidates == every.candidates[:16]
        assert (few.invoker.id, few.evict, few.migrate) == (every.invoker.id, every.evict,
                                                            every.migrate)
