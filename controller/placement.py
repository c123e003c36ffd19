"""Placement: which invoker a new instance goes to, and what must make room for it there.

The scheduler works on a :class:`ClusterView`, plain data kept up to date incrementally (the
controller's instance pool builds one per decision from its instances; ``bench.replay
--simulate`` keeps one of 1,000 invokers and drives this same :func:`place`).

Policies (``policy`` argument):

- ``ours``: ServerlessLLM's startup-time-optimized placement (OSDI'24 §6). For every invoker
  that can host the instance, estimate ``queue + load + migration``
  (:mod:`controller.estimator`): the time its queued loads still need, checkpoint size /
  bandwidth of the fastest tier holding the checkpoint there (DRAM, SSD, or a copy from
  elsewhere: ``remote``), and the migration cost when running inferences must move away
  first: token-based recompute ``a * tokens + b`` plus the destinations' loads of the moved
  instances' models (``Slot.move_s``), as in §6. A load of a checkpoint already starting on
  the invoker is shared (the invoker fetches and reads a checkpoint once): the new load waits
  for that one only, then maps the checkpoint from the DRAM tier. Pick the minimum; estimates
  within :data:`TIE_FRACTION` + :data:`TIE_SECONDS` of it are ties, settled by no eviction or
  migration first, then the fewest invocations in flight and loads starting (instances on one
  invoker share its compute: a GPU, or on a CPU invoker its cores; the startup estimate does
  not model that, and the first token of the new instance's call waits for it), then the most
  free memory.
- ``locality``: the fastest tier holding the checkpoint (DRAM, then SSD, then none), ties to the
  invoker with the most free memory; never migrates and ignores queued loads.
- ``least-loaded``: the invoker with the fewest invocations in flight and loads starting, ties
  to the most free memory.
- ``random``: any invoker that can host it, uniformly.

An invoker can host an instance needing ``need`` bytes when its free memory covers it, or would
after unloading idle instances (least recently used first), or (``ours`` only) after migrating
running instances away (fewest tokens first) as well, provided another invoker has that much
free or idle memory to take them (ServerlessLLM §6 migrates only to a server with room).

Worked example (the test ``test_worked_example``): a 1 GB checkpoint needing 1 GB of memory;
invoker a holds it in DRAM (10 GB/s) but its memory is full of one running instance with 500
tokens in flight; b holds it on SSD (2 GB/s) with room; c has no copy (network 1 GB/s, SSD
2 GB/s) and room. With migration at 1 ms per token + 0.1 s: a = 0.1 + 0.6 = 0.7 s, b = 0.5 s,
c = 1.5 s: ``ours`` picks b, ``locality`` also b (a cannot host it without migrating).

One module: the view placement reads (:class:`ClusterView`, kept by ``put``/``drop``) and the one
pass over it that every policy shares (:func:`place`), which must stay under 1 ms at 1,000
invokers.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal, NamedTuple

from controller import estimator
from controller.estimator import Bandwidths, Estimate, MigrationCost, estimate, startup_s
from sllm.messages import BandwidthRecord
from sllm.tiers import TIER_RANK, Tier

Policy = Literal["ours", "locality", "least-loaded", "random"]
POLICIES: tuple[Policy, ...] = ("ours", "locality", "least-loaded", "random")

PLACEMENT_KEEP = 16
"""Candidate estimates a decision keeps (best first); the decision records how many there were."""

TIE_FRACTION = 0.10
TIE_SECONDS = 0.01
"""``ours`` takes estimates within 10% + 10 ms of the best as equal: bandwidths are measured,
and invokers that share hardware differ only by measurement noise, which must not decide
whether a warm idle instance is evicted."""


@dataclass
class Slot:
    """One instance's hold on an invoker."""

    memory_bytes: int
    kind: Literal["starting", "idle", "busy", "pinned"]
    # pinned: held, and neither unloading nor migrating frees it (an instance already
    # migrating or draining, or a busy one of the model being placed: moving it to make room
    # for another copy of itself gains nothing)
    last_used: float = 0.0  # unix seconds (idle instances: the LRU key)
    tokens: int = 0  # busy: tokens (prompt + generated) its inferences hold, what migration moves
    move_s: float = 0.0  # busy: seconds its destination needs to load its model first
    ready_by: float = 0.0  # starting: unix seconds its load is estimated to end
    model: str = ""  # starting: the model it loads (loads of one checkpoint share its read)


@dataclass
class InvokerState:
    """One invoker as the scheduler sees it. Aggregates are kept by :meth:`put` / :meth:`drop`
    so that a decision costs O(1) per invoker.

    Attributes:
        memory_bytes: its instance memory budget.
        bandwidths: its measured bandwidths (fixed once built: a view is rebuilt when they
            change).
        in_flight: invocations running on it (least-loaded's key; ours settles ties by it).
    """

    id: str
    url: str
    memory_bytes: int
    bandwidths: Bandwidths
    in_flight: int = 0
    slots: dict[str, Slot] = field(default_factory=dict)
    used_bytes: int = 0  # held by all its slots
    idle_bytes: int = 0  # held by idle slots (can be unloaded)
    busy_bytes: int = 0  # held by busy slots (can be migrated away)
    busy_tokens: int = 0
    busy_move_s: float = 0.0  # destinations' load seconds, over its busy slots
    starting: int = 0
    ready_by: float = 0.0  # latest ready_by among its starting slots (unix seconds)
    loading: dict[str, float] = field(default_factory=dict)  # model -> latest ready_by of its
    # starting slots: a new load of that model joins theirs

    seconds_per_byte: tuple[float, ...] = field(init=False)
    """Seconds per checkpoint byte from each tier, in TIERS order (one multiply per candidate);
    from ``bandwidths`` at construction, which is why those are fixed for the state's life."""

    def __post_init__(self) -> None:
        # raises ValueError for a bandwidth that is not positive
        self.seconds_per_byte = estimator.seconds_per_byte(self.bandwidths)

    def put(self, instance_id: str, slot: Slot) -> None:
        """Add or replace an instance's slot."""
        self.drop(instance_id)
        self.slots[instance_id] = slot
        self.used_bytes += slot.memory_bytes
        if slot.kind == "idle":
            self.idle_bytes += slot.memory_bytes
        elif slot.kind == "busy":
            self.busy_bytes += slot.memory_bytes
            self.busy_tokens += slot.tokens
            self.busy_move_s += slot.move_s
        elif slot.kind == "starting":
            self.starting += 1
            self.ready_by = max(self.ready_by, slot.ready_by)
            if slot.model:
                self.loading[slot.model] = max(self.loading.get(slot.model, 0.0), slot.ready_by)

    def drop(self, instance_id: str) -> None:
        """Remove an instance's slot (absent: nothing happens)."""
        slot = self.slots.pop(instance_id, None)
        if slot is None:
            return
        self.used_bytes -= slot.memory_bytes
        if slot.kind == "idle":
            self.idle_bytes -= slot.memory_bytes
        elif slot.kind == "busy":
            self.busy_bytes -= slot.memory_bytes
            self.busy_tokens -= slot.tokens
            self.busy_move_s -= slot.move_s
        elif slot.kind == "starting":
            self.starting -= 1
            self.ready_by = max((s.ready_by for s in self.slots.values() if s.kind == "starting"),
                                default=0.0)
            if slot.model:
                rest = [s.ready_by for s in self.slots.values()
                        if s.kind == "starting" and s.model == slot.model]
                if rest:
                    self.loading[slot.model] = max(rest)
                else:
                    del self.loading[slot.model]

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.used_bytes

    @property
    def work(self) -> int:
        """Invocations in flight and loads starting: what shares its compute."""
        return self.in_flight + self.starting


@dataclass
class ClusterView:
    """What placement needs to know: invokers and where checkpoints are.

    Attributes:
        invokers: invoker id -> its state.
        tiers: model -> {invoker id -> the fastest tier holding its checkpoint there}.
    """

    invokers: dict[str, InvokerState] = field(default_factory=dict)
    tiers: dict[str, dict[str, Tier]] = field(default_factory=dict)

    def set_tier(self, model: str, invoker_id: str, tier: Tier | None) -> None:
        """Record where ``model``'s checkpoint is on an invoker (None: no local copy)."""
        by_inv = self.tiers.setdefault(model, {})
        if tier is None or tier == "remote":
            by_inv.pop(invoker_id, None)
        else:
            by_inv[invoker_id] = tier


@dataclass(frozen=True)
class PlacementRequest:
    """A new instance to place.

    Attributes:
        model: its model (the checkpoint to load).
        nbytes: checkpoint size (bytes).
        memory_bytes: instance memory it reserves (bytes).
    """

    model: str
    nbytes: int
    memory_bytes: int


@dataclass(frozen=True)
class Placement:
    """A decision: where, what to unload or migrate first, and every candidate's estimate.

    Attributes:
        invoker: the chosen invoker.
        chosen: its estimate.
        evict: idle instance ids to unload first, least recently used first.
        migrate: busy instance ids to migrate away first (fewest tokens first).
        candidates: up to ``keep`` estimates, best (smallest total) first.
        considered: how many invokers could host the instance.
    """

    policy: Policy
    invoker: InvokerState
    chosen: Estimate
    evict: tuple[str, ...]
    migrate: tuple[str, ...]
    candidates: tuple[Estimate, ...]
    considered: int


def place(
    view: ClusterView, req: PlacementRequest, *, policy: Policy = "ours",
    migration: MigrationCost | None = None, now: float | None = None,
    rng: random.Random | None = None, keep: int = PLACEMENT_KEEP,
) -> Placement | None:
    """Choose an invoker for ``req`` by ``policy`` (see the module docstring).

    Args:
        view: the cluster.
        req: the instance to place.
        policy: ``ours``, ``locality``, ``least-loaded`` or ``random``.
        migration: the token-based migration cost; None means migration is not considered.
        now: unix seconds (queued loads are counted from it); default time.time().
        rng: randomness for ``random``.
        keep: candidate estimates to keep in the decision.

    Returns:
        The decision, or None when no invoker can host the instance (even by unloading every
        idle instance, or by migrating when allowed).

    Raises:
        ValueError: an unknown policy, or an invoker's bandwidth is not positive.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; use one of {', '.join(POLICIES)}")
    now = time.time() if now is None else now
    need = req.memory_bytes
    nbytes = req.nbytes
    held = view.tiers.get(req.model, {})
    may_migrate = policy == "ours" and migration is not None
    # room the moved instances could go to: the two largest free + idle memories of the cluster
    # (the largest may be the candidate's own), found in the same pass; candidates that need
    # instances moved away are checked against them after it
    room1 = room2 = -1
    room1_id = ""
    rank = TIER_RANK
    join = policy == "ours"
    model = req.model
    startup = startup_s
    # Candidates that need instances moved away (kept apart: the room check after the loop may
    # drop them) and the others. Of the others only those that may be among the ``keep`` best
    # get a row: once ``keep`` rows total at most ``bound`` seconds, a candidate above it cannot
    # be, so most candidates cost an estimate and a comparison (the best ``keep`` are the same).
    # ``locality`` and ``least-loaded`` pick by their own keys over every candidate as they
    # come; ``random`` among all (it never migrates).
    movers: list[Row] = []
    rows: list[Row] = []
    bound = math.inf
    plain = 0  # candidates that need nothing moved away, kept or not
    others = None if policy == "ours" else _OtherPick(policy)
    new_row = tuple.__new__  # a Row without NamedTuple's keyword handling: this loop is hot
    for inv in view.invokers.values():
        free = inv.memory_bytes - inv.used_bytes
        room = free + inv.idle_bytes
        if may_migrate and room > room2:  # only a migration needs to know
            if room > room1:
                room1, room2, room1_id = room, room1, inv.id
            else:
                room2 = room
        evict = migrate = False
        if free < need:
            if room >= need:
                evict = True
            elif may_migrate and room + inv.busy_bytes >= need:
                evict = inv.idle_bytes > 0
                migrate = True
            else:
                continue
        joined = inv.loading.get(model) if join and inv.loading else None
        if joined is not None:
            # a load of this checkpoint is starting there: the invoker fetches and reads a
            # checkpoint once, so this load ends with that one, then maps it from its DRAM tier
            t = 0
            queue_s = joined - now if joined > now else 0.0
        else:
            t = rank[held.get(inv.id, "remote")]
            queue_s = inv.ready_by - now if inv.ready_by > now else 0.0
        spb = inv.seconds_per_byte[t]
        if migrate and migration is not None:  # (migrate implies a migration cost)
            mig_s = migration.seconds(inv.busy_tokens) + inv.busy_move_s
            movers.append(new_row(Row, (startup(queue_s, nbytes, spb, mig_s), t, inv.id, queue_s,
                                        spb, mig_s, evict, True, inv)))
            continue
        plain += 1
        if others is not None:  # another policy's pick, over every candidate
            others.see(inv, t, queue_s, evict, free)
        total = startup(queue_s, nbytes, spb)
        if total > bound:
            continue
        rows.append(new_row(Row, (total, t, inv.id, queue_s, spb, 0.0, evict, False, inv)))
        if keep > 0 and len(rows) >= 4 * keep:
            rows = heapq.nsmallest(keep, rows)
            bound = rows[-1].total_s
    if movers:  # what would move must have somewhere to go: the most room on another invoker
        movers = [r for r in movers if (room2 if r.invoker_id == room1_id else room1)
                  >= need - (r.invoker.memory_bytes - r.invoker.used_bytes + r.invoker.idle_bytes)]
    considered = plain + len(movers)
    rows += movers
    if not rows:
        return None
    best = heapq.nsmallest(keep, rows)  # ids are unique: comparison never reaches the invoker
    if policy == "ours":
        # estimates within the measurement noise of the best are a tie: among those, prefer
        # no eviction (keep warm instances warm), then the invoker with the least work sharing
        # its compute, then the most free memory
        near = best[0].total_s * (1 + TIE_FRACTION) + TIE_SECONDS
        pick = min((r for r in best if r.total_s <= near), key=lambda r: (
            r.evicts or r.migrates, r.invoker.work, -r.invoker.free_bytes, r.total_s, r.invoker_id))
    else:
        assert others is not None
        inv, t, queue_s, evict = others.pick(rng or random)
        spb = inv.seconds_per_byte[t]
        pick = Row(startup(queue_s, nbytes, spb), t, inv.id, queue_s, spb, 0.0, evict, False, inv)
    evict_ids, migrate_ids = _make_room(pick.invoker, need, migrate=pick.migrates)
    return Placement(
        policy=policy, invoker=pick.invoker, chosen=pick.estimate(nbytes), evict=evict_ids,
        migrate=migrate_ids, candidates=tuple(r.estimate(nbytes) for r in best),
        considered=considered,
    )


class _OtherPick:
    """The baselines' picks, over every candidate as it comes (``ours`` picks among the best
    estimates instead): ``locality`` the fastest tier, then the most free memory;
    ``least-loaded`` the least work in flight, then the most free memory; ``random`` any, with
    the decision's randomness. None of them migrates."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._key: tuple[int, int, str] | None = None
        self._best: tuple[InvokerState, int, float, bool] | None = None
        self._all: list[tuple[InvokerState, int, float, bool]] = []

    def see(self, inv: InvokerState, rank: int, queue_s: float, evicts: bool, free: int) -> None:
        if self._policy == "random":
            self._all.append((inv, rank, queue_s, evicts))
            return
        key = (rank, -free, inv.id) if self._policy == "locality" else (inv.work, -free, inv.id)
        if self._key is None or key < self._key:
            self._key, self._best = key, (inv, rank, queue_s, evicts)

    def pick(self, rng: random.Random | ModuleType) -> tuple[InvokerState, int, float, bool]:
        """``(invoker, tier rank, queue seconds, evicts)`` of the pick; call after a candidate."""
        if self._policy == "random":
            return rng.choice(self._all)  # type: ignore[no-any-return]
        assert self._best is not None
        return self._best


class Row(NamedTuple):
    """A candidate invoker as one decision ranks it: by ``total_s``, then the faster tier,
    then the invoker id (fields in that order, so rows sort by tuple comparison)."""

    total_s: float  # its startup estimate (controller.estimator.startup_s)
    rank: int  # the rank of the tier its load would read from (sllm.tiers.TIERS)
    invoker_id: str
    queue_s: float
    seconds_per_byte: float  # of that tier on that invoker
    migration_s: float
    evicts: bool  # idle instances must be unloaded first
    migrates: bool  # running instances must be moved away first
    invoker: InvokerState

    def estimate(self, nbytes: int) -> Estimate:
        """The row's estimate, part by part (:func:`controller.estimator.estimate`)."""
        return estimate(self.invoker_id, self.rank, self.queue_s, nbytes, self.seconds_per_byte,
                        self.migration_s, evicts=self.evicts, migrates=self.migrates)


def destination_estimates(view: ClusterView, model: str, nbytes: int, need: int, *,
                          now: float) -> list[tuple[float, str]]:
    """Where a migrated instance's destination would start: the two smallest startup estimates
    ``(queue + load seconds, invoker id)``, smallest first, among invokers with room for it
    without migrating anything (free + idle memory >= ``need`` bytes), loading ``model``'s
    ``nbytes``-byte checkpoint from the fastest tier each holds. Two, so that a caller can skip
    the migrating instance's own invoker. ServerlessLLM §6 counts the destination's load in the
    migration cost; a remote copy of a large checkpoint can cost more than the recompute.

    Cost: O(invokers); a caller estimating many busy instances keeps the answer per model."""
    held = view.tiers.get(model, {})
    rank = TIER_RANK
    return heapq.nsmallest(2, (
        (startup_s(inv.ready_by - now if inv.ready_by > now else 0.0, nbytes,
                   inv.seconds_per_byte[rank[held.get(inv.id, "remote")]]), inv.id)
        for inv in view.invokers.values() if inv.free_bytes + inv.idle_bytes >= need))


def _make_room(inv: InvokerState, need: int, *, migrate: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Idle instances to unload (LRU first) and, when ``migrate``, busy ones to move away
    (fewest tokens first) until ``need`` bytes are free on ``inv``."""
    free = inv.free_bytes
    evict: list[str] = []
    moved: list[str] = []
    if free >= need:
        return (), ()
    for iid, slot in sorted(((i, s) for i, s in inv.slots.items() if s.kind == "idle"),
                            key=lambda p: p[1].last_used):
        evict.append(iid)
        free += slot.memory_bytes
        if free >= need:
            return tuple(evict), ()
    if migrate:
        for iid, slot in sorted(((i, s) for i, s in inv.slots.items() if s.kind == "busy"),
                                key=lambda p: p[1].tokens):
            moved.append(iid)
            free += slot.memory_bytes
            if free >= need:
                break
    return tuple(evict), tuple(moved)


def holder_urls(held: Mapping[str, Tier], urls: Mapping[str, str], exclude: str | None = None
                ) -> list[str]:
    """URLs of the live invokers holding a checkpoint, the sources a fetch of it tries in order:
    DRAM tier first, then by invoker id.

    Args:
        held: invoker id -> the fastest tier holding the checkpoint there.
        urls: live invoker id -> URL (holders not in it are left out).
        exclude: an invoker id to leave out (the one that fetches).
    """
    order = sorted(held.items(), key=lambda p: (p[1] != "dram", p[0]))
    return [urls[i] for i, _ in order if i != exclude and i in urls]


def bandwidths_of(record: BandwidthRecord | None) -> Bandwidths:
    """:class:`Bandwidths` from an invoker record's measured ``bandwidths``. An invoker that
    published none (a version that did not measure) is taken as 1 GB/s for every tier, so it
    is still placed, though by memory and queue rather than by its speed."""
    if record is None:
        return Bandwidths(dram_bps=1e9, ssd_bps=1e9, network_bps=1e9)
    return Bandwidths(dram_bps=record.dram_bps, ssd_bps=record.ssd_bps,
                      network_bps=record.network_bps)
