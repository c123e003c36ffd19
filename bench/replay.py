"""Trace replay: the placement policies (``controller.placement``) compared on one bursty,
skewed invocation trace, either simulated at cluster scale or against a real local runtime.

    .venv/bin/python bench/replay.py --simulate [--json]     # 1,000 invokers, 10,000 functions
    .venv/bin/python bench/replay.py [--duration 90] [--json] # 3 invokers, 8 functions, real models
    .venv/bin/python bench/replay.py --policies ours --migrations live,preempt,off \
        --output-median 96 --output-max 192   # live migration on and off, and preemption

The simulation of 300 s at 100 invocations/s takes about 40 s for the four policies; the real
cluster about 20 s of start-up and stop plus ``--duration`` per policy (and ~10 s once to build
the models).

Common flags: ``--policies ours,locality,least-loaded,random``, ``--duration`` (s), ``--rate``
(invocations/s), ``--functions``, ``--invokers``, ``--seed``, ``--keep-alive`` (s),
``--max-instances`` (per function), ``--zipf-s``, ``--cv``. Every policy replays the same trace
(same seed). On the cluster, ``--seeds 1,2,3`` replays one trace per seed and adds a ``pooled``
row per policy: its figures over all its runs' invocations (see :func:`run_cluster`).
``--json`` prints one JSON line per policy (the figures below, the machine, the parameters);
otherwise a table.

**The trace** (``bench/trace.py``): the Azure Functions trace's shape (Shahrad et al., ATC'20):
Zipf popularity over the functions (exponent 1.0: function 0 is the most popular), each function
an independent gamma renewal process (coefficient of variation 3: bursts and long silences),
lognormal prompt lengths (words) and lognormal output lengths (``max_tokens``), clipped.

**--simulate**: an event-driven simulation that calls the real :func:`controller.placement.place`
(imported, not copied) on a :class:`~controller.placement.ClusterView` of 1,000 invokers, kept up
to date with ``put`` / ``drop`` as instances start, serve, idle and go, never rebuilt:

- invokers: instance memory of 24, 40 or 80 GB (half, 30%, 20% of them); bandwidths drawn per
  invoker: DRAM tier 10-20 GB/s, SSD 1-3 GB/s, network 0.8-1.2 GB/s; a DRAM tier of ``--dram-gb``
  (32 GB) holding recently loaded checkpoints, least recently used out (never one a loaded
  instance uses); an unbounded SSD: a checkpoint stays there once loaded. At the start every
  checkpoint is on the SSD of ``--ssd-copies`` (2) random invokers and nothing is in DRAM.
- functions: one model each, checkpoint 0.3-15 GB (log-uniform: median 2.1 GB), an instance
  reserves 1.2x its checkpoint; time per output token 10 ms + 3 ms per checkpoint GB, prefill
  5 ms + 0.02 ms per prompt token per checkpoint GB (a GPU-like profile); 1.3 tokens per word.
- an invocation takes an idle instance of its function (the most recently used: a warm start);
  else, below ``--max-instances``, a placement decision (``place()``, timed with
  ``perf_counter_ns`` around the call only): the idle instances it names are unloaded, and a new
  instance loads on the chosen invoker, ready after the chosen estimate's total (queue + load
  from the tier + migration 0): loads on one invoker run one after another, as the estimator
  assumes; once loaded, its checkpoint enters that invoker's DRAM tier. The estimate is
  therefore exact here: the simulation compares the policies' choices, not the estimator's
  accuracy. When ``place()`` returns None (every invoker full of busy or starting instances) the
  invocation waits and placement is tried again when an instance goes idle or away (first
  blocked function first). The simulation does not model live migration: a decision that needs
  it is replaced by the best one without, as ``controller.pool`` does with ``--migration off``
  (two ``place()`` calls); the real cluster's ``--migrations`` compares the modes.
- instances serve one invocation at a time (targetConcurrency 1) and are unloaded after
  ``--keep-alive`` (60 s) idle; at most ``--max-instances`` (128) per function. After the trace
  ends the simulation runs on until every invocation has been served.

Rows (per policy): ``decisions`` = ``place()`` calls (including those that found no room and
the migration fallbacks); ``dec/s`` = calls / total seconds spent inside ``place()``;
``p50/p99/max ms``: one call's time (milliseconds, wall clock of this process, GC included);
``cpu p99``: the same as this thread's CPU time, which other processes on the machine do not
inflate (``load`` is the 1-minute load average when the policy finished: above ~1 other
processes competed for the CPU and the wall-clock columns carry their noise); ``no room``:
calls that returned None;
``TTFT mean/p50/p99 s``: simulated time to first token (seconds) = waiting for an instance +
load + prefill, over the invocations arriving after ``--warmup`` (60 s); ``cold`` = those served
by an instance loaded for them, split by the tier the checkpoint was loaded from (``dram``,
``ssd``, ``remote`` = copied over the network, then loaded from SSD); ``evict`` = idle instances
unloaded to make room; ``sim s`` = wall-clock seconds of the whole simulation.

**Default mode (a real cluster)**: for each policy a fresh runtime (``cli.launcher.start``: etcd,
controller with ``--placement <policy>``, gateway, ``--invokers`` (3) invokers, each with its
own local store, DRAM pool of ``--dram-pool`` (512Mi) and share of the cores,
``--invoker-threads`` (cores / invokers, at least 1)) on free loopback ports, with the
home folder ``$SLLM_HOME/bench-replay/run-<policy>-<migration>-seed<seed>`` (emptied first;
its logs stay in ``run/``, one folder per seed, so a later run does not overwrite them; the
rest, the invokers' copies of the checkpoints and etcd's data, is deleted at the end).
Models: ``--functions`` (8) random-weight llamas (hidden 768, 2-6 layers: 50-151 MB
float32 checkpoints), built once into ``$SLLM_HOME/bench-replay/models`` (the store root the
invokers fetch from). Function ``i`` serves model ``i``; ``resources.memory`` is 192Mi and each invoker's
budget holds ``--per-invoker`` (2) instances, so the cluster holds fewer instances than there
are functions; ``keepAlive`` ``--keep-alive`` (15 s), ``maxInstances`` ``--max-instances`` (2).
At the start each checkpoint is in the local store (SSD tier) of ``--ssd-copies`` (1) invokers
drawn from ``--seed``, the same for every policy (a cluster that has served these models before,
as in the simulation; 0 starts from empty stores, where every function's first load is a copy
from the store root whatever the policy); the DRAM tiers are empty. Before each policy the store
root's checkpoint files are evicted from the page cache, so no policy's first copies profit from
the previous one's reads. Invocations arriving in the first ``--warmup`` (0) seconds are
replayed but not counted in the figures. The trace (``--duration`` 90 s at
``--rate`` 3/s; prompt median 24 words, ``max_tokens`` median 12, at most 48) is replayed with
asyncio + httpx: each invocation is sent at its trace time, streaming
(``POST /v1/functions/<f>/invoke``), its SSE stream read to the end. On a 2-core machine the
client, the gateway, the controller and the three invokers share the cores: TTFTs include that
contention, and runs of the same policy differ by tens of percent.

``--migrations live,preempt,off`` (default ``live``) replays the trace once per policy and
migration mode (the controller's ``--migration``): ``live`` moves running inferences away by
live migration when the scheduler frees an invoker for another function, ``preempt`` unloads
them at once (their invocations resume on another instance from their tokens: kill and restart
elsewhere), ``off`` never moves them (the scheduler takes another invoker or waits). Migration
matters when inferences run long next to loads: ``--output-median`` / ``--output-max`` (tokens,
default 12 / 48) lengthen the answers, and ``--big N`` gives the N most popular functions big
models (``--big-layers`` 40: about 1 GB), whose loads take long enough that moving a running
inference off the invoker holding them in its DRAM tier can pay; ``--network-limit 200M`` caps
checkpoint fetches (from peers and the store root) as a remote object store would.
``--replication`` (``ours``) says which policies' controllers run burst-ready replication
(:mod:`controller.replication`: an in-use function's checkpoint is copied to more invokers in
calm periods until those holding it can host ``maxInstances``): ``ours`` only (it is part of
the system under test; the baselines are placement policies that copy on a miss), ``all``
(every policy gets the copies, to tell placement's share from replication's), or ``none``;
``copied ahead`` counts the copies it completed. The JSON's ``cpu_s`` gives the CPU seconds
each kind of process (controller, gateway, invokers, etcd) used during the replay (Linux).
``--record DIR`` keeps each run in ``DIR/<policy>-<migration>-seed<N>/``: its logs (``logs/``;
later runs reuse the runtime's folder) and one JSON line per invocation (``invocations.jsonl``:
arrival and send time, function, status, TTFT and TTLT in seconds, instance, the gateway's
timings), which ``bench/compare.py`` pools across batches.

Rows (per policy and migration mode): ``requests`` sent; ``errors`` by HTTP status (``stream``: an error event after
the first token; ``conn``: no answer); ``TTFT mean/p50/p99`` (seconds, client side: from sending
the request to the first token event; successful invocations); ``warm p50`` / ``cold p50``;
``cold`` = invocations whose final event says ``cold``, by cause: ``first`` (the function's first
load in the run), ``keep-alive`` (its last instance was scaled down after keep-alive),
``eviction`` (its last instance was unloaded to make room for another function), ``scale-out``
(another invocation of it was in flight: a second instance), ``joined`` (got the instance
whose load another invocation started), ``other`` (an instance stopped for another reason);
causes come from the controller log's ``instance ... stopped: <reason>`` lines, or, when the
log does not say, from the gap since the function's last use against ``keepAlive``; and by tier
(the final event's ``tier``: ``dram``, ``ssd``, ``remote``); ``dec ms``: the controller's
placement decision times from its log (p50; the JSON has the max too, milliseconds);
``TTLT mean/p99``: time to last token (client side, sending to the end of the stream);
``moves``: streams moved while running, by reason (``migrated`` / ``preempted`` / ``failed``,
from the final events' ``migrations``). The JSON's ``slowest`` lists the five invocations with
the highest TTFT and where their time went (the gateway's queue, load, controller and prefill
seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import heapq
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import launcher
from controller.estimator import Bandwidths, MigrationCost
from controller.placement import (
    POLICIES,
    ClusterView,
    InvokerState,
    PlacementRequest,
    Policy,
    Slot,
    place,
)
from sllm import config
from sllm.config import MIGRATION_FIXED_S, MIGRATION_PER_TOKEN_S
from sllm.sse import parse_events


def _bench_module(name: str) -> Any:
    """``bench/<name>.py`` by its path: ``bench`` is no package, and a plain ``import trace``
    could find the standard library's module of that name."""
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sllm_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_trace = _bench_module("trace")
evict_from_page_cache = _bench_module("pagecache").evict
TOKENS_PER_WORD: float = _trace.TOKENS_PER_WORD
Arrival = _trace.Arrival
Streams = _trace.Streams
TraceModel = _trace.TraceModel
generate = _trace.generate
streams = _trace.streams

GB = 1e9
TIERS = ("dram", "ssd", "remote")


# --- common -------------------------------------------------------------------------------------


def pct(xs: Any, q: float) -> float:
    """The ``q``-th percentile of ``xs`` (NaN when empty)."""
    a = np.asarray(xs, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gb": round(mem / GB, 1), "python": platform.python_version(),
            "numpy": np.__version__}


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """Rows as a text table: ``cols`` are (header, key, format)."""
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([format(r[k], f) if isinstance(r.get(k), int | float) else str(r.get(k, ""))
                      for _, k, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- simulation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """The simulated cluster (see the module docstring)."""

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
        if d is not None and d.migrate:  # as controller.pool.decide with --migration off
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


def print_simulation(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"simulated: {args.invokers} invokers, {args.functions} functions, {args.duration:g} s "
          f"at {args.rate:g}/s ({rows[0]['arrivals']} invocations, {rows[0]['measured']} after "
          f"the {args.warmup:g} s warm-up), seed {args.seed}")
    for r in rows:
        r["cold_tiers"] = "/".join(str(r["cold_by_tier"][t]) for t in TIERS)
    print(table(rows, [
        ("policy", "policy", ""), ("decisions", "decisions", "d"),
        ("dec/s", "decisions_per_s", ".0f"),
        ("p50 ms", "decision_ms_p50", ".3f"), ("p99 ms", "decision_ms_p99", ".3f"),
        ("max ms", "decision_ms_max", ".2f"), ("cpu p99", "decision_cpu_ms_p99", ".3f"),
        ("TTFT mean s", "ttft_mean_s", ".3f"),
        ("p50 s", "ttft_p50_s", ".3f"), ("p99 s", "ttft_p99_s", ".3f"),
        ("cold", "cold_starts", "d"), ("dram/ssd/remote", "cold_tiers", ""),
        ("evict", "evictions", "d"), ("no room", "no_room", "d"), ("sim s", "sim_wall_s", ".1f"),
        ("load", "loadavg_1m", ".1f"),
    ]))


# --- real cluster -------------------------------------------------------------------------------

MODEL_PREFIX = "replay-v1-"
"""Models are named ``replay-v1-<i>``; the version changes when their shape does."""

INSTANCE_MEMORY = 192 << 20
"""``resources.memory`` of every function (bytes): above the largest default checkpoint (151
MB). ``--big`` models reserve the same, so an invoker hosts ``--per-invoker`` instances of any
size (the slots, not the bytes, run out)."""

REAL_TRACE = TraceModel(prompt_median_words=24, prompt_sigma=0.6, prompt_max_words=128,
                        output_median_tokens=12, output_sigma=0.7, output_max_tokens=48)
"""Shorter prompts and answers than the simulation's: every token is computed on 2 CPU cores."""


def bench_dir() -> Path:
    return config.sllm_home() / "bench-replay"


def build_models(root: Path, count: int, big: int = 0, big_layers: int = 40
                 ) -> list[tuple[str, int]]:
    """``count`` random-weight llamas in the store at ``root`` (kept: built once), as
    (name, checkpoint bytes). Model ``i`` has 2 + i % 5 layers of hidden size 768; with
    ``big``, models 0 .. big-1 have ``big_layers`` layers instead (about 25 MB per layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from store.importer import import_model
    from store.model_store import ModelStore
    from tests.tiny_model import make_tokenizer

    hf_logging.disable_progress_bar()
    store = ModelStore(root)
    out = []
    for i in range(count):
        layers = big_layers if i < big else 2 + i % 5
        name = f"{MODEL_PREFIX}{i}" if i >= big else f"{MODEL_PREFIX}big{layers}-{i}"
        if not store.exists(name):
            print(f"building model {name} into {root}", file=sys.stderr)
            tok = make_tokenizer()
            cfg = LlamaConfig(
                vocab_size=len(tok), hidden_size=768, intermediate_size=2048,
                num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                max_position_embeddings=1024, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            torch.manual_seed(1000 + i)
            model = LlamaForCausalLM(cfg).eval()
            with tempfile.TemporaryDirectory(prefix="sllm-replay-") as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                import_model(tmp, store, name=name)
        out.append((name, store.get(name).nbytes))
    return out


def manifest(name: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
            "spec": {"model": model,
                     "resources": {"device": "auto", "memory": INSTANCE_MEMORY},
                     "scaling": {"minInstances": 0, "maxInstances": args.max_instances,
                                 "targetConcurrency": 1, "keepAlive": f"{args.keep_alive:g}s",
                                 "queueTimeout": "120s"},
                     "generation": {"maxTokens": max(64, args.output_max), "temperature": 0.0}}}


@dataclass
class Result:
    """One invocation as the client saw it (seconds from the replay's start)."""

    arrival: Arrival
    function: str
    sent: float = 0.0
    first: float | None = None
    end: float = 0.0
    status: int | str = 0  # HTTP status, "stream" (error event) or "conn"
    error: str = ""
    done: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.done)

    @property
    def timings(self) -> dict[str, Any]:
        return self.done.get("timings", {}) if self.done else {}

    @property
    def cold(self) -> bool:
        return bool(self.timings.get("cold_start"))


async def _invoke(client: httpx.AsyncClient, res: Result, t0: float) -> None:
    a = res.arrival
    body = {"prompt": a.prompt, "max_tokens": a.max_tokens, "stream": True}
    res.sent = time.perf_counter() - t0
    try:
        async with client.stream("POST", f"/v1/functions/{res.function}/invoke", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return
            lines: list[str] = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    continue
                for name, data in parse_events(lines):  # one whole event
                    if name == "token":
                        res.tokens += 1
                        if res.first is None:
                            res.first = time.perf_counter() - t0
                    elif name == "done":
                        res.done = data
                    elif name == "error":
                        res.status, res.error = "stream", json.dumps(data)[:300]
                lines = []
    except httpx.HTTPError as e:
        res.status, res.error = "conn", f"{type(e).__name__}: {e}"[:300]
    finally:
        res.end = time.perf_counter() - t0


async def replay(gateway: str, arrivals: list[Arrival], names: list[str]) -> list[Result]:
    """Send every arrival at its trace time (streaming) and read its answer to the end."""
    results = [Result(a, names[a.function_index]) for a in arrivals]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=gateway, timeout=300.0, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for res in results:
            delay = res.arrival.t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_invoke(client, res, t0)))
        await asyncio.gather(*tasks)
    return results


_STOPPED = re.compile(r"instance (\S+) stopped: (.*)$")
_DECIDED = re.compile(r"decided in ([0-9.]+) ms")
_REPLICATED = re.compile(r"replicated \S+ to \S+: ")


def read_controller_log(path: Path) -> tuple[dict[str, str], list[float], int]:
    """From the controller's log: instance id -> why it stopped, decision times (ms), and the
    checkpoint copies burst-ready replication completed."""
    reasons: dict[str, str] = {}
    decided: list[float] = []
    replicated = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if m := _STOPPED.search(line):
                reasons[m.group(1)] = m.group(2)
            elif m := _DECIDED.search(line):
                decided.append(float(m.group(1)))
            elif _REPLICATED.search(line):
                replicated += 1
    return reasons, decided, replicated


def cpu_seconds(state: launcher.RuntimeState) -> dict[str, float]:
    """CPU seconds (user + system) each kind of process of a running runtime has used so far:
    ``controller``, ``gateway``, ``invokers`` (summed) and ``etcd``, from ``/proc/<pid>/stat``
    (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for p in state.processes:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kind = "invokers" if p.name.startswith("invoker") else p.name.split("-")[0]
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {k: round(v, 2) for k, v in sorted(out.items())}


def classify(results: list[Result], reasons: dict[str, str], keep_alive: float) -> list[str]:
    """The cause of each successful cold start (see the module docstring), in send order."""
    causes = []
    by_fn: dict[str, list[Result]] = {}
    for r in sorted((r for r in results if r.ok), key=lambda r: r.sent):
        prior = by_fn.setdefault(r.function, [])
        iid = r.done.get("instance_id")
        if r.cold:
            if any(p.cold and p.done.get("instance_id") == iid for p in prior):
                causes.append("joined")
            elif not prior:
                causes.append("first")
            elif any(p.end > r.sent for p in prior):
                causes.append("scale-out")
            else:
                last = max(prior, key=lambda p: p.end)
                why = reasons.get(last.done.get("instance_id", ""), "")
                if "evict" in why:
                    causes.append("eviction")
                elif "keep-alive" in why or "scaled down" in why:
                    causes.append("keep-alive")
                elif why:
                    causes.append("other")
                else:  # the log does not say: judge by the idle gap
                    causes.append("keep-alive" if r.sent - last.end >= keep_alive else "eviction")
        prior.append(r)
    return causes


def summarize(results: list[Result], causes: list[str], decided: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok and r.first is not None]
    ttft = [r.first - r.sent for r in ok]  # type: ignore[operator]
    ttlt = [r.end - r.sent for r in ok]
    moves = Counter(m["reason"] for r in ok for m in r.done.get("migrations", []))
    warm = [r.first - r.sent for r in ok if not r.cold]  # type: ignore[operator]
    cold = [r for r in ok if r.cold]
    errors = Counter(str(r.status) for r in results if not r.ok)
    loads: dict[str, list[float]] = {}
    for r in cold:
        loads.setdefault(str(r.timings.get("tier")), []).append(r.timings.get("load_seconds", 0.0))
    return {
        "requests": len(results), "ok": len(ok), "errors": dict(errors),
        "ttft_mean_s": float(np.mean(ttft)) if ttft else float("nan"),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "warm_ttft_p50_s": pct(warm, 50),
        "ttlt_mean_s": float(np.mean(ttlt)) if ttlt else float("nan"),
        "ttlt_p99_s": pct(ttlt, 99),
        "moves": dict(moves),
        "cold_ttft_p50_s": pct([r.first - r.sent for r in cold], 50),  # type: ignore[operator]
        "cold_starts": len(cold),
        "cold_causes": dict(Counter(causes)),
        "cold_by_tier": dict(Counter(str(r.timings.get("tier")) for r in cold)),
        "load_s_mean_by_tier": {t: float(np.mean(v)) for t, v in sorted(loads.items())},
        "send_lag_p99_s": pct([r.sent - r.arrival.t for r in results], 99),
        "controller_decision_ms_p50": pct(decided, 50),
        "controller_decision_ms_max": max(decided) if decided else float("nan"),
        "tokens": sum(r.tokens for r in ok),
        "error_samples": sorted({f"{r.status}: {r.error}" for r in results if not r.ok})[:5],
        "slowest": [_breakdown(r) for r in heapq.nlargest(
            5, ok, key=lambda r: r.first - r.sent)],  # type: ignore[operator]
    }


def _breakdown(r: Result) -> dict[str, Any]:
    """Where one invocation's TTFT went (seconds; the gateway's timings, client-side TTFT)."""
    t = r.timings
    return {"arrival_s": round(r.arrival.t, 3), "function": r.function,
            "ttft_s": round(r.first - r.sent, 3),  # type: ignore[operator]
            "start": t.get("start"), "tier": t.get("tier"),
            **{k: t.get(f"{k}_seconds") for k in ("queue", "load", "controller", "prefill")}}


def preplace(home: Path, models: list[tuple[str, int]], invokers: int, copies: int,
             seed: int) -> None:
    """Put each model's checkpoint in the local stores (the SSD tier) of ``copies`` invokers of
    the runtime at ``home``, drawn at random from ``seed``, so every policy starts from the same
    cluster, one that has served these models before (as the simulation does). The copies are
    hard links to the store root's files (a plain copy where a link is impossible): the loader
    reads with O_DIRECT, so a read costs the same either way.
    """
    rng = random.Random(seed)
    for name, _ in models:
        for i in sorted(rng.sample(range(invokers), min(copies, invokers))):
            shutil.copytree(bench_dir() / "models" / name, launcher.invoker_store(home, i) / name,
                            copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_cluster_policy(policy: Policy, migration: str, args: argparse.Namespace,
                       models: list[tuple[str, int]], arrivals: list[Arrival],
                       seed: int) -> tuple[dict[str, Any], _Measured]:
    """Start a fresh runtime with ``policy`` and ``migration`` (the checkpoints pre-placed by
    :func:`preplace` from ``seed``), deploy the functions, replay, stop. Returns the row and
    what it was computed from (for pooling runs)."""
    home = bench_dir() / f"run-{policy}-{migration}-seed{seed}"
    shutil.rmtree(home, ignore_errors=True)
    preplace(home, models, args.invokers, args.ssd_copies, seed)
    # every policy's first copies come from the disk, not from the page cache the previous left
    evict_from_page_cache((bench_dir() / "models").glob("*/data-*.bin"))
    memory = args.per_invoker * INSTANCE_MEMORY
    ports = launcher.free_ports(4 + args.invokers)
    t0 = time.perf_counter()
    replication = args.replication == "all" or (args.replication == "ours" and policy == "ours")
    state = launcher.start(
        home, invokers=args.invokers, placement=policy, migration=migration,
        replication=replication,
        gateway_port=ports[0], controller_port=ports[1], etcd_port=ports[2],
        etcd_peer_port=ports[3], invoker_ports=ports[4:],
        store=bench_dir() / "models", invoker_memory=f"{memory >> 20}Mi",
        dram_pool=args.dram_pool, tick_s=0.5, stop_at_exit=True,
        invoker_network_limit=args.network_limit, invoker_threads=args.invoker_threads,
    )
    startup_s = time.perf_counter() - t0
    names = [f"replay-{i}" for i in range(len(models))]
    try:
        with httpx.Client(base_url=state.gateway_url, timeout=60.0) as c:
            for name, (model, _) in zip(names, models, strict=True):
                r = c.put(f"/v1/functions/{name}", json=manifest(name, model, args))
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"deploying {name} failed: {r.status_code} {r.text}")
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(state)
        results = asyncio.run(replay(state.gateway_url, arrivals, names))
        replay_s = time.perf_counter() - t0
        cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_seconds(state).items()}
    finally:
        launcher.stop(state)
        for bulky in ("invokers", "etcd"):  # checkpoint copies, etcd's preallocated WAL: not logs
            shutil.rmtree(home / bulky, ignore_errors=True)
    reasons, decided, replicated = read_controller_log(home / "run" / "controller.log")
    # causes need each function's whole history; the figures count arrivals after the warm-up
    colds = [r for r in sorted(results, key=lambda r: r.sent) if r.ok and r.cold]
    causes = [c for r, c in zip(colds, classify(results, reasons, args.keep_alive), strict=True)
              if r.arrival.t >= args.warmup]
    measured = _Measured([r for r in results if r.arrival.t >= args.warmup], causes, decided)
    kept = None if args.record is None else Path(args.record) / f"{policy}-{migration}-seed{seed}"
    row = {"mode": "cluster", "policy": policy, "migration": migration, "seed": seed,
           **summarize(measured.results, measured.causes, measured.decided),
           "replication": replication,
           "replicated": replicated,
           "cpu_s": cpu,
           "startup_s": startup_s, "replay_s": replay_s,
           "logs": str(home / "run" if kept is None else kept / "logs")}
    if kept is not None:
        record_run(kept, home, results, {**row, "warmup": args.warmup})
    return row, measured


def record_run(dest: Path, home: Path, results: list[Result], row: dict[str, Any]) -> None:
    """Keep one run at ``dest`` (replaced if there): a copy of its logs (``dest/logs``), its row
    (``dest/row.json``, with ``warmup``) and ``dest/invocations.jsonl``, one line per invocation
    (times in seconds from the replay's start; ``ttft_s`` None for a failed call), including
    those before the warm-up."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(home / "run", dest / "logs")
    (dest / "row.json").write_text(json.dumps(row, default=str) + "\n")
    with (dest / "invocations.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps({
                "arrival_s": round(r.arrival.t, 6), "sent_s": round(r.sent, 6),
                "function": r.function, "status": r.status, "ok": r.ok,
                "ttft_s": None if r.first is None or not r.ok else round(r.first - r.sent, 6),
                "ttlt_s": round(r.end - r.sent, 6), "tokens": r.tokens,
                "instance_id": r.done.get("instance_id"), "timings": r.timings,
                "migrations": len(r.done.get("migrations", [])),
            }) + "\n")


@dataclass
class _Measured:
    """One run's measured invocations, their cold-start causes and the decision times (ms)."""

    results: list[Result]
    causes: list[str]
    decided: list[float]


def run_order(policies: list[Policy], seed: int) -> list[Policy]:
    """The order in which seed ``seed``'s runs replay: ``policies`` rotated left by ``seed``, so
    over any ``len(policies)`` consecutive seeds each policy runs first once, whichever seed a
    batch starts from."""
    k = seed % len(policies)
    return policies[k:] + policies[:k]


def run_cluster(args: argparse.Namespace, policies: list[Policy]) -> list[dict[str, Any]]:
    """One row per seed, policy and migration mode; with several seeds also one ``pooled`` row
    per policy and mode: the figures over the invocations of all its runs (the p99 of seeds 1-3,
    885 invocations, is about the 9th-worst rather than one run's 3rd-worst, so one burst weighs
    less), with each run's p99 in ``run_p99_s``. Seed ``s`` runs the policies rotated by
    ``s``, so no policy always runs first or last while the machine's speed drifts, in one batch
    or across batches. Unless ``--prime`` is 0, a replay of that many trace seconds, neither
    measured nor recorded, comes first, so the first measured run does not meet a machine that
    has been idle (docs/benchmarks.md section 4, batch U)."""
    models = build_models(bench_dir() / "models", args.functions, args.big, args.big_layers)
    model = TraceModel(**{**REAL_TRACE.__dict__, "zipf_s": args.zipf_s, "cv": args.cv,
                          "output_median_tokens": args.output_median,
                          "output_max_tokens": args.output_max})
    rows = []
    migrations = args.migrations.split(",")
    if args.prime > 0:
        prime = argparse.Namespace(**{**vars(args), "record": None})
        seed = max(args.seeds) + 1  # a trace no measured run replays
        if not args.json:
            print(f"  priming: {policies[0]} replays {args.prime:g} s, not measured",
                  file=sys.stderr)
        run_cluster_policy(policies[0], migrations[0], prime, models,
                           generate(args.functions, args.prime, args.rate, seed, model), seed)
    pooled: dict[tuple[str, str], list[tuple[dict[str, Any], _Measured]]] = {}
    for seed in args.seeds:
        arrivals = generate(args.functions, args.duration, args.rate, seed, model)
        for policy in run_order(policies, seed):
            for migration in migrations:
                if not args.json:
                    print(f"  seed {seed}, {policy} (migration {migration}): starting a runtime, "
                          f"replaying {len(arrivals)} invocations over {args.duration:g} s",
                          file=sys.stderr)
                row, measured = run_cluster_policy(policy, migration, args, models, arrivals, seed)
                row["checkpoint_mb"] = [round(b / 1e6) for _, b in models]
                rows.append(row)
                pooled.setdefault((policy, migration), []).append((row, measured))
    if len(args.seeds) > 1:
        for (policy, migration), runs in pooled.items():
            rows.append({
                "mode": "cluster", "policy": policy, "migration": migration, "seed": "pooled",
                **summarize([r for _, m in runs for r in m.results],
                            [c for _, m in runs for c in m.causes],
                            [d for _, m in runs for d in m.decided]),
                "run_p99_s": [row["ttft_p99_s"] for row, _ in runs],
                "replication": runs[0][0]["replication"],
                "replicated": sum(row["replicated"] for row, _ in runs),
                "cpu_s": {k: round(sum(row["cpu_s"].get(k, 0.0) for row, _ in runs), 2)
                          for k in runs[0][0]["cpu_s"]},
                "checkpoint_mb": runs[0][0]["checkpoint_mb"],
            })
    return rows


def print_cluster(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"cluster: {args.invokers} invokers x {args.per_invoker} instances, {args.functions} "
          f"functions (checkpoints {rows[0]['checkpoint_mb']} MB), {args.duration:g} s at "
          f"{args.rate:g}/s ({rows[0]['requests']} invocations), keepAlive {args.keep_alive:g} s, "
          f"DRAM pool {args.dram_pool}, seeds {','.join(map(str, args.seeds))}")
    causes = ("first", "keep-alive", "eviction", "scale-out", "joined", "other")
    for r in rows:
        r["errs"] = ",".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "0"
        r["causes"] = "/".join(str(r["cold_causes"].get(c, 0)) for c in causes)
        r["tiers"] = "/".join(str(r["cold_by_tier"].get(t, 0)) for t in TIERS)
        r["moved"] = ",".join(f"{k}:{v}" for k, v in sorted(r["moves"].items())) or "0"
    print(table(rows, [
        ("policy", "policy", ""), ("migration", "migration", ""), ("seed", "seed", ""),
        ("requests", "requests", "d"),
        ("errors", "errs", ""),
        ("TTFT mean s", "ttft_mean_s", ".3f"), ("p50 s", "ttft_p50_s", ".3f"),
        ("p99 s", "ttft_p99_s", ".3f"), ("warm p50", "warm_ttft_p50_s", ".3f"),
        ("cold p50", "cold_ttft_p50_s", ".3f"), ("cold", "cold_starts", "d"),
        ("first/ka/evict/scale/join/other", "causes", ""), ("dram/ssd/remote", "tiers", ""),
        ("dec ms p50", "controller_decision_ms_p50", ".2f"),
        ("TTLT mean s", "ttlt_mean_s", ".3f"), ("TTLT p99 s", "ttlt_p99_s", ".3f"),
        ("moves", "moved", ""), ("copied ahead", "replicated", "d"),
    ]))
    for r in rows:
        if r["error_samples"]:
            print(f"{r['policy']} errors: {r['error_samples']}")


# --- command line -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", action="store_true", help="simulate 1,000 invokers instead")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    ap.add_argument("--duration", type=float, help="trace seconds (simulate 300, cluster 90)")
    ap.add_argument("--rate", type=float, help="invocations per second (simulate 100, cluster 3)")
    ap.add_argument("--functions", type=int, help="functions (simulate 10000, cluster 8)")
    ap.add_argument("--invokers", type=int, help="invokers (simulate 1000, cluster 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", default=None,
                    help="cluster: comma-separated seeds, one replay per seed and policy, pooled "
                         "per policy as well [default: --seed]")
    ap.add_argument("--keep-alive", type=float, help="seconds (simulate 60, cluster 15)")
    ap.add_argument("--max-instances", type=int, help="per function (simulate 128, cluster 2)")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="popularity exponent")
    ap.add_argument("--cv", type=float, default=3.0, help="inter-arrival coefficient of variation")
    ap.add_argument("--warmup", type=float,
                    help="trace seconds whose arrivals are not measured (simulate 60, cluster 0)")
    ap.add_argument("--dram-gb", type=float, default=32.0, help="simulate: DRAM tier per invoker")
    ap.add_argument("--ssd-copies", type=int,
                    help="invokers holding each checkpoint on SSD at the start (simulate 2, "
                         "cluster 1; 0: empty local stores)")
    ap.add_argument("--per-invoker", type=int, default=2, help="cluster: instances per invoker")
    ap.add_argument("--dram-pool", default="512Mi", help="cluster: each invoker's DRAM tier")
    ap.add_argument("--invoker-threads", type=int, default=None,
                    help="cluster: threads each invoker computes with (default: cores / invokers)")
    ap.add_argument("--big", type=int, default=0,
                    help="cluster: the first N functions (the most popular) get big models")
    ap.add_argument("--big-layers", type=int, default=40,
                    help="cluster: layers of a big model (about 25 MB each)")
    ap.add_argument("--network-limit", default=None,
                    help="cluster: cap each invoker's checkpoint fetches (bytes/s, e.g. 200M): "
                         "the store root as a remote object store")
    ap.add_argument("--migrations", default="live",
                    help="cluster: comma-separated controller migration modes (live,preempt,off)")
    ap.add_argument("--output-median", type=float, default=REAL_TRACE.output_median_tokens,
                    help="cluster: median max_tokens of an invocation")
    ap.add_argument("--output-max", type=int, default=REAL_TRACE.output_max_tokens,
                    help="cluster: largest max_tokens")
    ap.add_argument("--replication", default="ours", choices=("ours", "all", "none"),
                    help="cluster: which policies' controllers copy in-use checkpoints ahead of "
                         "bursts (controller.replication): ours only, all, or none")
    ap.add_argument("--record", default=None, metavar="DIR",
                    help="cluster: keep each run's logs and invocations under DIR "
                         "(for bench/compare.py)")
    ap.add_argument("--prime", type=float, default=20.0, metavar="SECONDS",
                    help="cluster: first replay this many trace seconds with the first policy, "
                         "neither measured nor recorded, so no measured run meets an idle "
                         "machine (0: none)")
    ap.add_argument("--json", action="store_true", help="one JSON line per policy")
    args = ap.parse_args()
    sim = args.simulate
    defaults = (("duration", 300.0, 90.0), ("rate", 100.0, 3.0), ("functions", 10_000, 8),
                ("invokers", 1000, 3), ("keep_alive", 60.0, 15.0), ("max_instances", 128, 2),
                ("warmup", 60.0, 0.0), ("ssd_copies", 2, 1))
    for name, s, c in defaults:  # (simulate, cluster)
        if getattr(args, name) is None:
            setattr(args, name, s if sim else c)
    policies: list[Policy] = []
    for p in args.policies.split(","):
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}; use {', '.join(POLICIES)}")
        policies.append(p)  # type: ignore[arg-type]
    if args.functions < 8:
        ap.error("--functions must be at least 8")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, not {args.seeds!r}")
    for m in args.migrations.split(","):
        if m not in ("live", "preempt", "off"):
            ap.error(f"unknown migration mode {m!r}; use live, preempt, off")

    rows = run_simulation(args, policies) if sim else run_cluster(args, policies)
    params = {k: v for k, v in vars(args).items() if k != "json"}
    info = machine()
    if args.json:
        for r in rows:
            print(json.dumps({**r, "params": params, "machine": info}, default=str))
    elif sim:
        print_simulation(rows, args)
    else:
        print_cluster(rows, args)


if __name__ == "__main__":
    main()
