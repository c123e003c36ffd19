"""bench.compare pools runs that ``python -m bench.replay`` recorded (``--record``) and bounds
the p99 difference with a bootstrap over (batch, seed) units. The runs here are written by the
replay's own ``record_run``, so the file format is the one a real batch leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import compare
from bench.replay.analysis import Result
from bench.replay.cluster import record_run, run_order
from bench.workload import Arrival


def record(batch: Path, policy: str, seed: int, ttfts: list[float | None], tmp: Path,
           warmup: float = 0.0) -> None:
    """One recorded run: invocation i arrives at t = i s; None is a call that failed."""
    home = tmp / f"home-{batch.name}-{policy}-{seed}"
    (home / "run").mkdir(parents=True)
    (home / "run" / "controller.log").write_text("a log line\n")
    results = []
    for i, ttft in enumerate(ttfts):
        r = Result(Arrival(t=float(i), function_index=0, prompt="hi", max_tokens=4),
                   "replay-0", sent=float(i))
        if ttft is None:
            r.status, r.error = 503, "no instance"
        else:
            r.status, r.first, r.end = 200, i + ttft, i + ttft + 0.1
            r.done = {"instance_id": "replay-0-x", "timings": {"start": "warm"}}
        results.append(r)
    record_run(batch / f"{policy}-live-seed{seed}", home, results,
               {"policy": policy, "migration": "live", "seed": seed, "warmup": warmup})


def test_pools_units_after_the_warm_up_and_counts_errors(tmp_path: Path) -> None:
    batch = tmp_path / "R"
    record(batch, "ours", 1, [9.0, 1.0, 2.0, None], tmp_path, warmup=1.0)
    record(batch, "random", 1, [3.0, 3.0, 4.0, 5.0], tmp_path, warmup=1.0)
    record(batch, "ours", 2, [0.5, 0.7], tmp_path)
    record(batch, "random", 2, [0.1, 6.0], tmp_path)
    assert (batch / "ours-live-seed1" / "logs" / "controller.log").read_text() == "a log line\n"
    out = compare.compare(compare.load_units([batch]), resamples=50)
    ours, rnd = out["policies"]["ours"], out["policies"]["random"]
    # the 9.0 s call arrived before the warm-up's end: not counted
    assert ours["invocations"] == 4 and ours["errors"] == 1
    assert ours["ttft_p99_s"] == pytest.approx(np.percentile([1.0, 2.0, 0.5, 0.7], 99))
    assert rnd["ttft_mean_s"] == pytest.approx(np.mean([3.0, 4.0, 5.0, 0.1, 6.0]))
    assert ours["run_p99_s"] == pytest.approx([np.percentile([1, 2], 99), np.percentile([0.5, 0.7], 99)])
    assert ours["lowest_in"] == 2 and rnd["lowest_in"] == 0
    assert out["ours_minus"]["best other"]["best"] == "random"
    assert out["ours_minus"]["random"]["ours_lower_in"] == 2


def test_the_interval_excludes_zero_for_a_real_difference_not_for_chance(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for b in ("R", "S"):
        for seed in (1, 2, 3):
            base = rng.exponential(1.0, 300)
            record(tmp_path / b, "ours", seed, list(base * 0.5), tmp_path)
            record(tmp_path / b, "locality", seed, list(base), tmp_path)
            record(tmp_path / b, "random", seed, list(rng.exponential(0.5, 300)), tmp_path)
    out = compare.compare(compare.load_units([tmp_path / "R", tmp_path / "S"]), resamples=400)
    assert out["units"] == 6
    lo, hi = out["ours_minus"]["locality"]["ci95_s"]
    assert hi < 0  # ours is half of locality in every unit
    # random draws from ours' distribution: its p99 differs from ours by chance only
    lo, hi = out["ours_minus"]["random"]["ci95_s"]
    assert lo < 0 < hi
    best = out["ours_minus"]["best other"]
    assert best["best"] == "random" and best["ci95_s"][0] < 0 < best["ci95_s"][1]


def test_a_unit_without_every_policy_is_left_out(tmp_path: Path) -> None:
    record(tmp_path / "R", "ours", 1, [1.0], tmp_path)
    record(tmp_path / "R", "random", 1, [2.0], tmp_path)
    record(tmp_path / "R", "ours", 2, [1.0], tmp_path)  # random's seed-2 run is missing
    assert compare.compare(compare.load_units([tmp_path / "R"]), resamples=10)["units"] == 1
    record(tmp_path / "S", "ours", 1, [1.0], tmp_path)
    record(tmp_path / "T", "random", 1, [1.0], tmp_path)
    with pytest.raises(ValueError, match="every policy"):
        compare.compare(compare.load_units([tmp_path / "S", tmp_path / "T"]))
    with pytest.raises(FileNotFoundError, match="no recorded run"):
        compare.load_units([tmp_path / "empty"])


def test_each_policy_leads_once_in_any_run_of_consecutive_seeds() -> None:
    # units pooled across batches: no policy may always be a batch's first run
    policies = ["ours", "locality", "least-loaded", "random"]
    for start in (1, 7, 10):  # where batches R and S, T and U began
        firsts = [run_order(policies, seed)[0] for seed in range(start, start + 4)]
        assert sorted(firsts) == sorted(policies)
        assert all(sorted(run_order(policies, seed)) == sorted(policies)
                   for seed in range(start, start + 4))
