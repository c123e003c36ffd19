"""One placement decision's cost (``controller.placement.place``) on a crowded cluster view.

    .venv/bin/python -m bench.decision [--invokers 1000] [--policy ours] [--repeats 5]

Builds one view of ``--invokers`` invokers (24, 40 or 80 GB of instance memory, random
bandwidths), each holding up to six idle, busy or starting instances of 2-10 GB, with 300
checkpoints on two invokers each, then times 400 decisions for requests of 2-16 GB (most
invokers are full enough that a decision weighs eviction and migration). Prints the median and
p99 wall-clock milliseconds of the best of ``--repeats`` passes (the least disturbed by other
processes). Unlike ``python -m bench.replay --simulate``, nothing changes between decisions, so
two versions of ``place`` compare on identical input.
"""

from __future__ import annotations

import argparse
import random
import time

from controller.estimator import Bandwidths, MigrationCost
from controller.placement import POLICIES, ClusterView, InvokerState, PlacementRequest, Slot, place

GB = 10**9


def crowded_view(invokers: int, rng: random.Random) -> ClusterView:
    """The view described in the module docstring."""
    view = ClusterView()
    for i in range(invokers):
        inv = InvokerState(id=f"i{i}", url="", memory_bytes=rng.choice([24, 40, 80]) * GB,
                           bandwidths=Bandwidths(rng.uniform(10, 20) * GB,
                                                 rng.uniform(1, 3) * GB, GB))
        view.invokers[inv.id] = inv
        used = 0
        for k in range(rng.randint(0, 6)):
            mem = rng.randint(2, 10) * GB
            if used + mem > inv.memory_bytes:
                break
            used += mem
            inv.put(f"{i}-{k}", Slot(mem, rng.choice(["idle", "busy", "starting"]), tokens=100,
                                     ready_by=5.0, model=f"m{rng.randint(0, 300)}"))
    for j in range(300):
        for i in rng.sample(range(invokers), 2):
            view.set_tier(f"m{j}", f"i{i}", rng.choice(["dram", "ssd"]))
    return view


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decision",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--invokers", type=int, default=1000)
    ap.add_argument("--policy", choices=POLICIES, default="ours")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    view = crowded_view(args.invokers, rng)
    migration = MigrationCost(per_token_s=0.001, fixed_s=0.1)
    reqs = [PlacementRequest(model=f"m{rng.randint(0, 300)}", nbytes=rng.randint(1, 15) * GB,
                             memory_bytes=rng.randint(2, 16) * GB) for _ in range(400)]
    passes = []
    for _ in range(args.repeats):
        ns = []
        for req in reqs:
            t0 = time.perf_counter_ns()
            place(view, req, policy=args.policy, migration=migration, now=1.0, rng=rng)
            ns.append(time.perf_counter_ns() - t0)
        ns.sort()
        passes.append((ns[len(ns) // 2] / 1e6, ns[int(len(ns) * 0.99)] / 1e6))
    p50, p99 = min(passes)
    print(f"{args.policy}: {args.invokers} invokers, {len(reqs)} decisions x {args.repeats}: "
          f"p50 {p50:.3f} ms, p99 {p99:.3f} ms (best pass)")


if __name__ == "__main__":
    main()
