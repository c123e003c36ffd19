"""Pool recorded trace replays across batches and say how sure a p99 comparison is.

One batch of ``python -m bench.replay --seeds 1,2,3`` gives each policy a p99 over ~900
invocations, and on a shared machine that p99 moves by up to 2x between batches of the same code
(docs/benchmarks.md §4). This pools every run recorded with ``--record DIR`` from any number
of batches::

    .venv/bin/python -m bench.replay --seeds 1,2,3 --max-instances 6 --record runs/R --json
    .venv/bin/python -m bench.compare runs/R runs/S [--json]

A *unit* is one (batch, seed): every policy replayed the same trace in it, back to back. Per
policy it prints the TTFT (seconds, client side, successful invocations after each run's
warm-up) mean and p99 over all units pooled, each unit's p99 and in how many units the policy
had the lowest p99. Then, for ``ours`` against each other policy and against the best of them
(the lowest pooled p99, chosen afresh in every resample), the pooled p99 difference with a 95%
interval from a bootstrap over units (``--resamples``, 2,000 by default): the units are drawn
with replacement and the p99s recomputed, so the interval carries the drift between batches and
seeds as well as the noise within a run. An interval wholly below 0 says ``ours`` has the lower
p99 beyond what the units' spread explains.

Errors (invocations without a first token) are counted, not folded into the percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import bootstrap_draws, ci95, pct

OURS = "ours"


def load_units(dirs: list[Path]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """Every recorded run under ``dirs``, as unit (batch dir, seed) -> policy -> run, where a run
    is ``{"ttft": array of seconds, "errors": count}``. Runs of other migration modes than
    ``live`` are left out.

    Raises:
        FileNotFoundError: a directory holds no recorded run.
    """
    units: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for d in dirs:
        runs = sorted(d.glob("*/row.json"))
        if not runs:
            raise FileNotFoundError(
                f"no recorded run under {d} (python -m bench.replay --record {d})")
        for row_path in runs:
            row = json.loads(row_path.read_text())
            if row.get("migration", "live") != "live":
                continue
            warmup = float(row.get("warmup", 0.0))
            ttft, errors = [], 0
            with (row_path.parent / "invocations.jsonl").open() as f:
                for line in f:
                    inv = json.loads(line)
                    if inv["arrival_s"] < warmup:
                        continue
                    if inv["ttft_s"] is None:
                        errors += 1
                    else:
                        ttft.append(inv["ttft_s"])
            units.setdefault((str(d), str(row["seed"])), {})[row["policy"]] = {
                "ttft": np.asarray(ttft), "errors": errors}
    return units


def compare(units: dict[tuple[str, str], dict[str, dict[str, Any]]], resamples: int = 2000,
            seed: int = 0) -> dict[str, Any]:
    """Pooled figures per policy and ``ours``' p99 against the others (module docstring).

    Only units in which every policy ran are used. Returns ``{"units": n, "policies": {policy:
    {"ttft_mean_s", "ttft_p99_s", "invocations", "errors", "run_p99_s", "lowest_in"}},
    "ours_minus": {other or "best other": {"p99_diff_s", "ci95_s", "ours_lower_in"}}}``;
    ``ours_minus`` is empty without ``ours`` or another policy.

    Raises:
        ValueError: no unit in which every policy ran.
    """
    policies = sorted({p for u in units.values() for p in u})
    keys = sorted(k for k, u in units.items() if all(p in u for p in policies))
    if not keys:
        raise ValueError(f"no batch and seed in which every policy of {policies} ran")
    per = {p: [units[k][p]["ttft"] for k in keys] for p in policies}
    run_p99 = {p: [pct(x, 99) for x in per[p]] for p in policies}
    lowest = [min(policies, key=lambda p: run_p99[p][i]) for i in range(len(keys))]
    out: dict[str, Any] = {"units": len(keys), "unit_names": [f"{b}:{s}" for b, s in keys],
                           "policies": {}, "ours_minus": {}}
    for p in policies:
        pooled = np.concatenate(per[p])
        out["policies"][p] = {
            "ttft_mean_s": float(pooled.mean()) if len(pooled) else float("nan"),
            "ttft_p99_s": pct(pooled, 99), "invocations": len(pooled),
            "errors": sum(units[k][p]["errors"] for k in keys),
            "run_p99_s": run_p99[p], "lowest_in": lowest.count(p),
        }
    others = [p for p in policies if p != OURS]
    if OURS not in policies or not others:
        return out
    draws = bootstrap_draws(len(keys), resamples, seed)
    diffs: dict[str, list[float]] = {p: [] for p in [*others, "best other"]}
    for draw in draws:
        resampled = {p: pct(np.concatenate([per[p][i] for i in draw]), 99) for p in policies}
        for p in others:
            diffs[p].append(resampled[OURS] - resampled[p])
        diffs["best other"].append(resampled[OURS] - min(resampled[p] for p in others))
    ours = out["policies"][OURS]["ttft_p99_s"]
    best = min(others, key=lambda p: out["policies"][p]["ttft_p99_s"])
    for p, ds in diffs.items():
        ref = best if p == "best other" else p
        lo, hi = ci95(ds)
        out["ours_minus"][p] = {
            "p99_diff_s": ours - out["policies"][ref]["ttft_p99_s"], "ci95_s": [lo, hi],
            "ours_lower_in": sum(run_p99[OURS][i] < run_p99[ref][i] for i in range(len(keys))),
            **({"best": best} if p == "best other" else {}),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path,
                    help="directories given to python -m bench.replay --record")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args()
    try:
        result = compare(load_units(args.dirs), args.resamples)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"compare: {e}")
    if args.json:
        print(json.dumps(result))
        return
    n = result["units"]
    print(f"{n} units (batch, seed): {', '.join(result['unit_names'])}")
    print(f"{'policy':<14}{'invocations':>12}{'errors':>8}{'mean s':>9}{'p99 s':>8}"
          f"{'lowest p99 in':>15}  each unit's p99 s")
    for p, r in result["policies"].items():
        print(f"{p:<14}{r['invocations']:>12}{r['errors']:>8}{r['ttft_mean_s']:>9.3f}"
              f"{r['ttft_p99_s']:>8.3f}{r['lowest_in']:>10} of {n}  "
              + " ".join(f"{x:.2f}" for x in r["run_p99_s"]))
    for p, r in result["ours_minus"].items():
        name = f"best other ({r['best']})" if p == "best other" else p
        lo, hi = r["ci95_s"]
        print(f"ours - {name}: pooled p99 {r['p99_diff_s']:+.3f} s, 95% interval "
              f"[{lo:+.3f}, {hi:+.3f}] s; ours lower in {r['ours_lower_in']} of {n} units")


if __name__ == "__main__":
    main()
