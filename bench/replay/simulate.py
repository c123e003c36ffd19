"""The event-driven simulation behind ``python -m bench.replay --simulate``: ``--invokers``
(1,000) invokers and ``--functions`` (10,000) functions replaying one workload
(:mod:`bench.workload`), every placement decided by the real :func:`controller.placement.place`
(imported, not copied) on a :class:`~controller.placement.ClusterView` kept up to date with
``put`` / ``drop`` as instances start, serve, idle and go, never rebuilt.

The simulated cluster, the functions' service profiles, the rules of the simulation and the
figures of a row are described in :mod:`bench.replay.__main__` (``python -m bench.replay
--help``). Times are simulated seconds from the trace's start, sizes bytes, unless a name says
otherwise (``*_gb``: GB of 1e9 bytes; ``*_ns``: nanoseconds of this process's clocks, timing
``place()`` itself).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import os
import random
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.stats import pct
from bench.workload import TOKENS_PER_WORD, Streams, TraceModel, streams
from controller.estimator import Bandwidths, MigrationCost
from controller.placement import (
    ClusterView,
    InvokerState,
    PlacementRequest,
    Policy,
    Slot,
    place,
)
from sllm.config import MIGRATION_FIXED_S, MIGRATION_PER_TOKEN_S

GB = 1e9
"""Bytes per GB (decimal, as checkpoint and memory sizes are quoted)."""

TIERS = ("dram", "ssd", "remote")
"""Where a cold start's checkpoint was loaded from, in the order the tables print them."""


@dataclass(frozen=True)
class SimConfig:
    """The simulated cluster (see :mod:`bench.replay.__main__`)."""

    invokers: int = 1000
    functions: int = 10_000
    keep_alive_s: float = 60.0
    max_instances: int = 128
    dram_bytes: float = 32 * GB
    ssd_copies: int = 2
    warmup_s: float = 60.0
    memory_gb: tuple[float, ...] = (24.0, 40.0, 80.0)
    memory_p: tuple[float, ...] = (0.5, 0.3, 0.2)
    checkpoint_gb: tuple[float, float] = (0.3, 15.0)
    memory_per_checkpoint: float = 1.2
    tpot_s: tuple[float, float] = (0.010, 0.003)  # fixed, per checkpoint GB
    prefill_s: tuple[float, float] = (0.005, 2e-5)  # fixed, per prompt token per checkpoint GB


@dataclass(eq=False)
class _Fn:
    """A simulated function: its model, its service profile, its waiting invocations and its
    instances."""

    index: int
    req: PlacementRequest
    tpot_s: float
    prefill_per_token_s: float
    prefill_fixed_s: float
    queue: deque[int] = field(default_factory=deque)  # arrivals waiting, oldest first
    instances: list[_Inst] = field(default_factory=list)  # alive
    idle: list[_Inst] = field(default_factory=list)  # most recently used last
    starting: int = 0
    blocked: bool = False  # in the simulator's blocked queue (place() found no room)


@dataclass(eq=False)
class _Inst:
    """A simulated instance; its slot in the view (``inv.slots[id]``) mirrors ``state``."""

    id: str
    fn: _Fn
    inv: InvokerState
    tier: str
    state: str = "starting"  # starting | busy | idle | gone
    last_used: float = 0.0


@dataclass
class _Dram:
    """One invoker's DRAM tier: checkpoints by recency; entries a loaded instance uses pinned."""

    capacity: float
    used: float = 0.0
    lru: OrderedDict[str, int] = field(default_factory=OrderedDict)
    pins: Counter[str] = field(default_factory=Counter)

    def insert(self, model: str, nbytes: int) -> tuple[bool, list[str]]:
        """Cache ``model`` (or refresh it); returns (cached, models evicted to make room)."""
        if model in self.lru:
            self.lru.move_to_end(model)
            return True, []
        if nbytes > self.capacity:
            return False, []
        out: list[str] = []
        free = self.capacity - self.used
        if free < nbytes:
            for m, b in self.lru.items():
                if not self.pins[m]:
                    out.append(m)
                    free += b
                    if free >= nbytes:
                        break
            if free < nbytes:
                return False, []
        for m in out:
            self.used -= self.lru.pop(m)
        self.lru[model] = nbytes
        self.used += nbytes
        return True, out


_READY, _DONE, _EXPIRE = 0, 1, 2
_TIER_CODE = {"dram": 0, "ssd": 1, "remote": 2}


class Simulation:
    """One policy's run over one trace. All times are simulated seconds from the trace's start."""

    def __init__(self, cfg: SimConfig, trace: Streams, policy: Policy, seed: int) -> None:
        self.cfg = cfg
        self.policy: Policy = policy
        self.rng = random.Random(seed)  # the random policy's choices
        self.migration = MigrationCost(MIGRATION_PER_TOKEN_S, MIGRATION_FIXED_S)
        gen = np.random.Generator(np.random.PCG64([seed, 2]))  # the cluster: same for all policies
        self.view = ClusterView()
        self.dram: dict[str, _Dram] = {}
        mem = gen.choice(np.array(cfg.memory_gb), size=cfg.invokers, p=np.array(cfg.memory_p))
        bw = gen.uniform([10, 1, 0.8], [20, 3, 1.2], size=(cfg.invokers, 3)) * GB
        for i in range(cfg.invokers):
            inv = InvokerState(id=f"inv-{i:04d}", url="", memory_bytes=int(mem[i] * GB),
                               bandwidths=Bandwidths(*map(float, bw[i])))
            self.view.invokers[inv.id] = inv
            self.dram[inv.id] = _Dram(cfg.dram_bytes)
        ids = list(self.view.invokers)
        lo, hi = np.log(cfg.checkpoint_gb[0]), np.log(cfg.checkpoint_gb[1])
        sizes = np.exp(gen.uniform(lo, hi, size=cfg.functions)) * GB
        self.fns: list[_Fn] = []
        for f in range(cfg.functions):
            nbytes = int(sizes[f])
            gb = nbytes / GB
            req = PlacementRequest(model=f"m{f}", nbytes=nbytes,
                                   memory_bytes=int(nbytes * cfg.memory_per_checkpoint))
            self.fns.append(_Fn(f, req, cfg.tpot_s[0] + cfg.tpot_s[1] * gb,
                                cfg.prefill_s[1] * gb, cfg.prefill_s[0]))
            for j in gen.choice(len(ids), size=min(cfg.ssd_copies, len(ids)), replace=False):
                self.view.set_tier(req.model, ids[j], "ssd")
        self.t = trace.t
        self.fn_of = trace.function
        self.prompt_tokens = np.rint(trace.prompt_words * TOKENS_PER_WORD).astype(np.int64)
        self.max_tokens = trace.max_tokens.astype(np.int64)
        n = len(trace)
        self.ttft = np.full(n, np.nan)
        self.cold_tier = np.full(n, -1, dtype=np.int8)  # -1: warm
        self.instances: dict[str, _Inst] = {}
        self.events: list[tuple[float, int, int, _Inst, float]] = []
        self.seq = 0
        self.now = 0.0
        self.blocked: deque[_Fn] = deque()
        self.decision_ns: list[int] = []  # wall clock inside place(), per call
        self.decision_cpu_ns: list[int] = []  # this thread's CPU time, per call (and 2 clock reads)
        self.placed = 0
        self.fallbacks = 0
        self.evictions = 0
        self.expiries = 0
        self.loads: Counter[str] = Counter()

    # events

    def _push(self, at: float, kind: int, inst: _Inst, arg: float = 0.0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, inst, arg))

    def run(self) -> None:
        t, n, events = self.t, len(self.t), self.events
        i = 0
        while i < n or events:
            if events and (i >= n or events[0][0] <= t[i]):
                at, _, kind, inst, arg = heapq.heappop(events)
                self.now = at
                if kind == _READY:
                    self._ready(inst)
                elif kind == _DONE:
                    self._done(inst)
                elif inst.state == "idle" and inst.last_used == arg:  # _EXPIRE, still idle
                    self.expiries += 1
                    self._remove(inst)
                    self._retry_blocked()
            else:
                self.now = float(t[i])
                fn = self.fns[self.fn_of[i]]
                fn.queue.append(i)
                self._dispatch(fn)
                i += 1

    # decisions

    def _dispatch(self, fn: _Fn) -> None:
        """Serve ``fn``'s waiting invocations from idle instances, then start instances for the
        rest (those not covered by instances already starting)."""
        while fn.queue and fn.idle:
            self._serve(fn.idle.pop(), fn.queue.popleft(), cold=False)
        want = len(fn.queue) - fn.starting
        while want > 0 and len(fn.instances) < self.cfg.max_instances:
            if not self._start(fn):
                if not fn.blocked:
                    fn.blocked = True
                    self.blocked.append(fn)
                return
            want -= 1

    def _place(self, req: PlacementRequest, migration: MigrationCost | None) -> Any:
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        d = place(self.view, req, policy=self.policy, migration=migration, now=self.now,
                  rng=self.rng)
        t1 = time.perf_counter_ns()
        self.decision_cpu_ns.append(time.thread_time_ns() - c0)
        self.decision_ns.append(t1 - t0)
        return d

    def _start(self, fn: _Fn) -> bool:
        d = self._place(fn.req, self.migration)
        if d is not None and d.migrate:  # as controller.instances.capacity decides with --migration off
            self.fallbacks += 1
            d = self._place(fn.req, None)
        if d is None:
            return False
        self.placed += 1
        for iid in d.evict:
            self.evictions += 1
            self._remove(self.instances[iid])
        inv = d.invoker
        ready = self.now + d.chosen.total_s
        inst = _Inst(id=f"i{self.placed}", fn=fn, inv=inv, tier=d.chosen.tier)
        self.instances[inst.id] = inst
        fn.instances.append(inst)
        fn.starting += 1
        inv.put(inst.id, Slot(fn.req.memory_bytes, "starting", ready_by=ready,
                             model=fn.req.model))
        self.loads[inst.tier] += 1
        self._push(ready, _READY, inst)
        return True

    def _retry_blocked(self) -> None:
        """Something went idle or away: place for blocked functions again, oldest first, until
        one still finds no room."""
        while self.blocked:
            fn = self.blocked.popleft()
            fn.blocked = False
            self._dispatch(fn)
            if fn.blocked:  # _dispatch put it at the back: it stays first in line
                self.blocked.pop()
                self.blocked.appendleft(fn)
                return

    # instances

    def _ready(self, inst: _Inst) -> None:
        fn, inv, model = inst.fn, inst.inv, inst.fn.req.model
        fn.starting -= 1
        dram = self.dram[inv.id]
        cached, evicted = dram.insert(model, fn.req.nbytes)
        for m in evicted:
            self.view.set_tier(m, inv.id, "ssd")
        self.view.set_tier(model, inv.id, "dram" if cached else "ssd")
        dram.pins[model] += 1
        if fn.queue:
            self._serve(inst, fn.queue.popleft(), cold=True)
        else:
            self._idle(inst)
            self._retry_blocked()

    def _serve(self, inst: _Inst, r: int, *, cold: bool) -> None:
        fn = inst.fn
        pt, mt = int(self.prompt_tokens[r]), int(self.max_tokens[r])
        prefill = fn.prefill_fixed_s + pt * fn.prefill_per_token_s
        self.ttft[r] = self.now - self.t[r] + prefill
        if cold:
            self.cold_tier[r] = _TIER_CODE[inst.tier]
        inst.state = "busy"
        inst.inv.put(inst.id, Slot(fn.req.memory_bytes, "busy", tokens=pt + mt))
        inst.inv.in_flight += 1
        self._push(self.now + prefill + mt * fn.tpot_s, _DONE, inst)

    def _done(self, inst: _Inst) -> None:
        inst.inv.in_flight -= 1
        fn = inst.fn
        if fn.queue:
            self._serve(inst, fn.queue.popleft(), cold=False)
            return
        self._idle(inst)
        self._retry_blocked()

    def _idle(self, inst: _Inst) -> None:
        inst.state = "idle"
        inst.last_used = self.now
        inst.inv.put(inst.id, Slot(inst.fn.req.memory_bytes, "idle", last_used=self.now))
        inst.fn.idle.append(inst)
        self._push(self.now + self.cfg.keep_alive_s, _EXPIRE, inst, self.now)

    def _remove(self, inst: _Inst) -> None:
        """Unload an idle instance (keep-alive expired, or evicted)."""
        inst.inv.drop(inst.id)
        inst.fn.instances.remove(inst)
        inst.fn.idle.remove(inst)
        inst.state = "gone"
        self.dram[inst.inv.id].pins[inst.fn.req.model] -= 1
        del self.instances[inst.id]

    # figures

    def result(self) -> dict[str, Any]:
        ns = np.asarray(self.decision_ns, dtype=np.float64)
        cpu = np.asarray(self.decision_cpu_ns, dtype=np.float64)
        measured = self.t >= self.cfg.warmup_s
        ttft = self.ttft[measured]
        tiers = self.cold_tier[measured]
        served = ttft[~np.isnan(ttft)]
        cold = int((tiers >= 0).sum())
        return {
            "decisions": len(ns), "placed": self.placed,
            "no_room": int(len(ns) - self.placed - self.fallbacks),
            "migration_fallbacks": self.fallbacks,
            "decisions_per_s": len(ns) / (ns.sum() / 1e9) if len(ns) else float("nan"),
            "decision_ms_mean": float(ns.mean() / 1e6) if len(ns) else float("nan"),
            "decision_ms_p50": pct(ns, 50) / 1e6, "decision_ms_p99": pct(ns, 99) / 1e6,
            "decision_ms_max": float(ns.max() / 1e6) if len(ns) else float("nan"),
            "decision_cpu_ms_p50": pct(cpu, 50) / 1e6, "decision_cpu_ms_p99": pct(cpu, 99) / 1e6,
            "arrivals": len(self.t), "measured": int(measured.sum()),
            "unserved": int(np.isnan(ttft).sum()),
            "ttft_mean_s": float(served.mean()) if len(served) else float("nan"),
            "ttft_p50_s": pct(served, 50), "ttft_p99_s": pct(served, 99),
            "cold_starts": cold, "cold_share": cold / max(1, len(served)),
            "cold_by_tier": {tier: int((tiers == c).sum()) for tier, c in _TIER_CODE.items()},
            "loads_by_tier": {tier: self.loads[tier] for tier in TIERS},
            "evictions": self.evictions, "expiries": self.expiries,
        }


def run_simulation(args: argparse.Namespace, policies: list[Policy]) -> list[dict[str, Any]]:
    cfg = SimConfig(invokers=args.invokers, functions=args.functions,
                    keep_alive_s=args.keep_alive, max_instances=args.max_instances,
                    dram_bytes=args.dram_gb * GB, ssd_copies=args.ssd_copies,
                    warmup_s=args.warmup)
    model = TraceModel(zipf_s=args.zipf_s, cv=args.cv)
    trace = streams(args.functions, args.duration, args.rate, args.seed, model)
    rows = []
    for policy in policies:
        t0 = time.perf_counter()
        sim = Simulation(cfg, trace, policy, args.seed)
        setup_s = time.perf_counter() - t0
        gc.collect()  # the previous policy's garbage is not this one's to collect
        t0 = time.perf_counter()
        sim.run()
        row = {"mode": "simulate", "policy": policy, **sim.result(),
               "setup_s": setup_s, "sim_wall_s": time.perf_counter() - t0,
               "loadavg_1m": os.getloadavg()[0]}
        rows.append(row)
        if not args.json:
            print(f"  {policy}: {row['decisions']} decisions, simulated in "
                  f"{row['sim_wall_s']:.1f} s", file=sys.stderr)
    return rows

