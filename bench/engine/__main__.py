"""The batching engine's benchmark, one command, every policy in the same run:

    .venv/bin/python -m bench.engine [--parts throughput,scheduling,simulation] [--trace PATH]
                                     [--json] [--batches 1,4,8,16] [--tokens 64]
                                     [--sched-loads 0.7,0.9] [--loads 0.7,0.9]

- ``throughput`` (:mod:`bench.engine.throughput`): 1-16 concurrent streams of fixed length on one
  SmolLM2 instance through the running runtime, per policy, against transformers' batched
  ``generate`` in the same run;
- ``scheduling`` (:mod:`bench.engine.scheduling`): a slice of the trace replayed through the
  running runtime at 0.7 and 0.9 of the instance's capacity measured in the same run, per
  policy on the same arrivals;
- ``simulation`` (:mod:`bench.engine.simulate`): the real scheduler over the whole trace and its
  heavy-tailed variant (output lengths ~ Pareto(1.2), the trace's mean), at several loads, under
  two cost models: this machine's (SmolLM2, profiled in the same run by
  :mod:`bench.engine.profile`; token counts divided by 8, batch 16; the KV budget unlimited and
  :data:`KV_TOKENS` tokens) and an assumed GPU one (see :data:`GPU`; token counts as in the
  trace, batch 64, the KV budget unlimited; at ``--gpu-loads`` only, its runs being the slow
  ones: a minute each; the MLFQ's quantum and starvation scaled by the ratio of the two
  machines' full-batch decode iterations). The load is the request rate over the instance's
  saturated capacity (:meth:`~bench.engine.simulate.Cost.capacity_rps`).

JSON rows: ``{"part": "throughput", "policy", "batch", "tokens_per_s", "tpot_s"}``,
``{"part": "scheduling", "workload": "trace", "policy", "load", "requests", "jct_mean_s",
"jct_p99_s", "ttft_mean_s", "ttft_p99_s", "unfinished"}`` and ``{"part": "simulation", "workload", "policy", "load", "requests", "jct_mean_s", "jct_p99_s",
"ttft_mean_s", "ttft_p99_s", "cost", "kv_tokens"}`` (``policy: "srpt"`` for the oracle).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
from pathlib import Path
from typing import Any

from bench.engine import simulate as sim
from bench.engine import workload
from bench.stats import machine, table
from sllm.manifest import Scheduling

GPU = sim.Cost(fixed_s=0.012, prefill_s=0.00012, decode_s=0.0003, name="gpu (assumed)")
"""An assumed GPU iteration, of the magnitude a 7B model in fp16 on one A100-class GPU shows in
published vLLM and Sarathi-Serve measurements (about 12 ms a decode iteration at small batch,
about 0.12 ms a prefill token): not measured here, since no GPU was lent when it was written."""

KV_TOKENS = 10_000
"""A bounded KV budget: SmolLM2-135M in float32 under ``memory: 1Gi`` (about 0.5 GB of cache at
46 KB a token)."""

CONTEXT = 8192


def simulation(args: argparse.Namespace, cpu: sim.Cost) -> list[dict[str, Any]]:
    """Every simulated run (module docstring), two at a time in worker processes (the
    simulation measures no wall time, so sharing the cores changes none of its numbers)."""
    raw = workload.read_trace(args.trace)
    runs = []
    default = Scheduling()
    for cost, divide, batch, loads, budgets in ((cpu, 8, 16, args.loads, (1 << 40, KV_TOKENS)),
                                                (GPU, 1, 64, args.gpu_loads, (1 << 40,))):
        # the MLFQ's seconds are this machine's: on another, as many of its full iterations
        scale = cost.seconds(0, batch) / cpu.seconds(0, 16)
        config = Scheduling(maxBatch=batch, quantum=default.quantum * scale,
                            starvation=default.starvation * scale)
        unit = workload.scaled(raw, divide=divide, context=CONTEXT, load=1.0, capacity_rps=1.0)
        capacity = cost.capacity_rps(unit, batch)
        for load in loads:
            trace = workload.scaled(raw, divide=divide, context=CONTEXT, load=load,
                                    capacity_rps=capacity)
            heavy = workload.heavy_tail(trace, alpha=1.2, context=CONTEXT)
            for name, requests in (("trace", trace), ("heavy-tail", heavy)):
                for kv in budgets:
                    for policy in ("fcfs", "mlfq", "srpt"):
                        runs.append(({"part": "simulation", "workload": name, "policy": policy,
                                      "load": load, "cost": cost.name,
                                      "kv_tokens": None if kv == 1 << 40 else kv},
                                     (requests, policy, cost, config, kv)))
    rows = []
    with cf.ProcessPoolExecutor(2) as pool:
        futures = [pool.submit(sim.simulate, *inputs) for _, inputs in runs]
        for (row, _), future in zip(runs, futures, strict=True):
            rows.append({**row, **future.result().row()})
            if not args.json:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,scheduling,simulation")
    ap.add_argument("--trace", type=Path, default=workload.TRACE)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each throughput stream generates")
    ap.add_argument("--policies", default="mlfq,fcfs,run-to-completion")
    ap.add_argument("--loads", default="0.7,0.9", help="the simulation's, on this machine")
    ap.add_argument("--sched-loads", default="0.7,0.9", help="the scheduling part's")
    ap.add_argument("--sched-requests", type=int, default=60,
                    help="requests of the trace the scheduling part replays (100: 50-70 s of "
                         "arrivals a policy and load, about 9 minutes in all on 2 vCPUs)")
    ap.add_argument("--sched-divide", type=float, default=8.0,
                    help="the scheduling part divides the trace's token counts by this")
    ap.add_argument("--sched-deadline", type=float, default=20.0,
                    help="seconds after the last arrival run-to-completion's replay stops")
    ap.add_argument("--gpu-loads", default="0.9", help="the simulation's, on the assumed GPU")
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.policies = args.policies.split(",")
    args.loads = [float(x) for x in args.loads.split(",")]
    args.sched_loads = [float(x) for x in args.sched_loads.split(",")]
    args.gpu_loads = [float(x) for x in args.gpu_loads.split(",")]
    parts = args.parts.split(",")

    from bench.coldstart import store_with
    from bench.engine import profile, scheduling, throughput

    store = store_with(args.model)
    rows: list[dict[str, Any]] = []
    if "throughput" in parts:
        rows += throughput.run(args)
    if "scheduling" in parts:
        rows += scheduling.run(args)
    if "simulation" in parts:
        cost, fit = profile.profile(profile.load(store.path(args.model)))
        rows += [{"part": "profile", **r} for r in fit]
        rows.append({"part": "cost", "cost": cost.name, "fixed_s": cost.fixed_s,
                     "prefill_s": cost.prefill_s, "decode_s": cost.decode_s})
        rows += simulation(args, cost)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(json.dumps(machine()))
    through = [r for r in rows if r["part"] == "throughput"]
    if through:
        print(throughput.report(through))
    for r in rows:
        if r["part"] == "cost":
            print(f"cost model {r['cost']}: {r['fixed_s'] * 1e3:.1f} ms + {r['prefill_s'] * 1e3:.3f} "
                  f"ms per prefill token + {r['decode_s'] * 1e3:.2f} ms per decode (GPU: "
                  f"{GPU.fixed_s * 1e3:.1f} + {GPU.prefill_s * 1e3:.3f} + {GPU.decode_s * 1e3:.2f})")
    replayed = [r for r in rows if r["part"] == "scheduling" and r["workload"] == "trace"]
    for r in rows:
        if r["part"] == "scheduling" and r["workload"] == "capacity":
            print(f"scheduling: capacity {r['capacity_rps']:.2f} requests/s ({r['requests']} "
                  f"requests at once, mean prompt {r['prompt_mean']:.0f} and output "
                  f"{r['output_mean']:.0f} tokens)")
    if replayed:
        print(table(replayed, [(c, c, f) for c, f in (
            ("load", ".1f"), ("policy", "s"), ("requests", "d"), ("unfinished", "d"),
            ("jct_mean_s", ".2f"), ("jct_p99_s", ".2f"), ("ttft_mean_s", ".2f"),
            ("ttft_p99_s", ".2f"))]))
    simulated = [r for r in rows if r["part"] == "simulation"]
    if simulated:
        print(table(simulated, [(c, c, f) for c, f in (
            ("cost", "s"), ("workload", "s"), ("kv_tokens", "d"), ("load", ".1f"),
            ("policy", "s"), ("jct_mean_s", ".2f"), ("jct_p99_s", ".2f"), ("ttft_mean_s", ".2f"),
            ("ttft_p99_s", ".2f"))]))


if __name__ == "__main__":
    main()
