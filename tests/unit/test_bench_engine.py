"""The engine benchmark's simulation and workloads on a slice of the real trace: every request
completes, the oracle bounds the mean JCT, and the scaling does what it says."""

from __future__ import annotations

import numpy as np
import pytest

from bench.engine.simulate import Cost, simulate
from bench.engine.workload import TRACE, heavy_tail, read_trace, scaled
from sllm.manifest import Scheduling

COST = Cost(0.04, 0.0012, 0.0025)

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason="../shared/traces is not beside the repository")


def requests(load: float, n: int = 400) -> list:
    raw = read_trace()[:n]
    unit = scaled(raw, divide=8, context=2048, load=1.0, capacity_rps=1.0)
    return scaled(raw, divide=8, context=2048, load=load, capacity_rps=COST.capacity_rps(unit, 16))


def test_scaling_sets_the_rate_and_clips_to_the_context() -> None:
    reqs = requests(0.5)
    rate = len(reqs) / (reqs[-1].arrival - reqs[0].arrival)
    unit = scaled(read_trace()[:400], divide=8, context=2048, load=1.0, capacity_rps=1.0)
    assert rate == pytest.approx(0.5 * COST.capacity_rps(unit, 16), rel=1e-6)
    assert all(1 <= r.prompt and 1 <= r.output and r.prompt + r.output <= 2048 for r in reqs)


def test_the_heavy_tail_keeps_arrivals_and_prompts_and_the_mean_output() -> None:
    reqs = scaled(read_trace(), divide=8, context=100_000, load=0.5, capacity_rps=1.0)
    heavy = heavy_tail(reqs, alpha=1.2, context=100_000)
    assert [(r.arrival, r.prompt) for r in heavy] == [(r.arrival, r.prompt) for r in reqs]
    ratio = np.mean([r.output for r in heavy]) / np.mean([r.output for r in reqs])
    assert 0.7 < ratio < 1.3  # a Pareto(1.2) sample mean converges slowly


@pytest.mark.parametrize("load", [0.5, 0.9])
def test_every_request_completes_and_the_oracle_bounds_the_mean_jct(load: float) -> None:
    reqs = heavy_tail(requests(load), alpha=1.2, context=2048)
    out = {p: simulate(reqs, p, COST, Scheduling(maxBatch=16), 1 << 30)
           for p in ("fcfs", "mlfq", "srpt", "run-to-completion")}
    for o in out.values():
        assert not np.isnan(o.jct).any() and (o.ttft <= o.jct).all() and (o.ttft > 0).all()
    assert out["srpt"].jct.mean() <= min(out["fcfs"].jct.mean(), out["mlfq"].jct.mean()) * 1.02
    assert out["run-to-completion"].jct.mean() > out["fcfs"].jct.mean()


def test_the_scheduling_replays_prompts_are_all_different_and_as_long_as_asked() -> None:
    from bench.engine.scheduling import Outcome, prompt_text, summary

    prompts = [prompt_text(i, 30) for i in range(40)]
    assert len(set(prompts)) == 40 and all(len(p.split()) == 30 for p in prompts)
    row = summary([Outcome(ttft=t, jct=2 * t, done=t < 4) for t in (1.0, 2.0, 3.0, 4.0)])
    assert (row["requests"], row["unfinished"], row["jct_mean_s"], row["ttft_mean_s"]) == (
        4, 1, 5.0, 2.5)
    assert 3.9 < row["ttft_p99_s"] <= 4.0


def test_the_scheduling_prompts_differ_in_every_position_count_and_the_burst_rate() -> None:
    from bench.engine.scheduling import WORDS, capacity_rps, prompt_text

    assert prompt_text(0, 0) == prompt_text(0, 1) == WORDS[1]
    for n in (2, 3, 5, 144):  # indices under len(WORDS) - 1 in one digit, then in two
        count = len(WORDS) - 1 if n < 3 else 300
        prompts = [prompt_text(i, n) for i in range(count)]
        assert len(set(prompts)) == len(prompts) and all(len(p.split()) == n for p in prompts)
    # a steady 4 requests/s, with a slow start and a long tail that the middle half leaves out
    ends = [0.1 * k for k in range(5)] + [1.0 + 0.25 * k for k in range(30)] + [30.0, 60.0]
    assert capacity_rps(ends[::-1]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        capacity_rps([1.0])
