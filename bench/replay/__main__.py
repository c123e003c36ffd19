"""Trace replay: the placement policies (``controller.placement``) compared on one bursty,
skewed invocation trace, either simulated at cluster scale or against a real local runtime.

    .venv/bin/python -m bench.replay --simulate [--json]     # 1,000 invokers, 10,000 functions
    .venv/bin/python -m bench.replay [--duration 90] [--json] # 3 invokers, 8 functions, real models
    .venv/bin/python -m bench.replay --policies ours --migrations live,preempt,off \
        --output-median 96 --output-max 192   # live migration on and off, and preemption

The simulation of 300 s at 100 invocations/s takes about 40 s for the four policies; the real
cluster about 20 s of start-up and stop plus ``--duration`` per policy (and ~10 s once to build
the models).

Common flags: ``--policies ours,locality,least-loaded,random``, ``--duration`` (s), ``--rate``
(invocations/s), ``--functions``, ``--invokers``, ``--seed``, ``--keep-alive`` (s),
``--max-instances`` (per function), ``--zipf-s``, ``--cv``. Every policy replays the same trace
(same seed). On the cluster, ``--seeds 1,2,3`` replays one trace per seed and adds a ``pooled``
row per policy: its figures over all its runs' invocations (see
:func:`bench.replay.cluster.run_cluster`). ``--json`` prints one JSON line per policy (the
figures below, the machine, the parameters); otherwise a table.

**The trace** (``bench/workload.py``): the Azure Functions trace's shape (Shahrad et al., ATC'20):
Zipf popularity over the functions (exponent 1.0: function 0 is the most popular), each function
an independent gamma renewal process (coefficient of variation 3: bursts and long silences),
lognormal prompt lengths (words) and lognormal output lengths (``max_tokens``), clipped.

**--simulate** (``bench/replay/simulate.py``): an event-driven simulation that calls the real
:func:`controller.placement.place` (imported, not copied) on a
:class:`~controller.placement.ClusterView` of 1,000 invokers, kept up to date with ``put`` /
``drop`` as instances start, serve, idle and go, never rebuilt:

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
  it is replaced by the best one without, as ``controller.instances.capacity`` does with ``--migration off``
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

**Default mode (a real cluster**, ``bench/replay/cluster.py``, its figures from
``bench/replay/analysis.py``): for each policy a fresh runtime (``cli.launcher.start``: etcd,
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
timings), which ``python -m bench.compare`` pools across batches.

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
import json
from typing import Any

from bench.replay.cluster import REAL_TRACE, run_cluster
from bench.replay.simulate import TIERS, run_simulation
from bench.stats import machine, table
from controller.placement import POLICIES, Policy


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


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
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
                         "(for python -m bench.compare)")
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
