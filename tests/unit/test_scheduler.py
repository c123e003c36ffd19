"""The iteration scheduler's worked examples (invoker/engine/scheduler.py's docstring): pure
decisions on plain numbers, ``now`` passed in."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from invoker.engine.scheduler import INITIAL_CAPACITY, Profile, Scheduler, Step, capacity_for
from sllm.manifest import Scheduling


def profiled(a: float = 0.1, b: float = 0.01) -> Profile:
    """A profile that learnt ``seconds = a + b * tokens`` (one job per iteration)."""
    p = Profile()
    for tokens in (1, 10, 50, 100, 300):
        p.observe(tokens, 1, a + b * tokens)
    return p


def sched(kv_tokens: int = 1 << 20, profile: Profile | None = None, **config: Any) -> Scheduler:
    return Scheduler(Scheduling(**config), kv_tokens, profile)


def test_the_profile_learns_the_iteration_cost() -> None:
    p = profiled()
    assert p.seconds(50) == pytest.approx(0.6, rel=1e-3)
    assert p.seconds(300) == pytest.approx(3.1, rel=1e-3)
    assert Profile().seconds(100) == 0.0  # nothing observed yet


def test_skip_join_places_a_job_by_its_estimated_prefill() -> None:
    s = sched(profile=profiled(), policy="mlfq", quantum=1.0, quantumRatio=2.0,
              maxBatchTokens=1000)
    long = s.add("long", now=0.0, known=300, limit=400)  # 3.1 s: levels 0 (1 s), 1 (2 s) skipped
    short = s.add("short", now=1.0, known=50, limit=100)  # 0.6 s
    assert (long.level, short.level) == (2, 0)
    assert [j for j, _ in s.decide(now=1.0).run] == ["short", "long"]  # the later one first


def test_skip_join_estimates_one_chunk_of_a_long_prompt() -> None:
    s = sched(profile=profiled(), policy="mlfq", quantum=1.0, quantumRatio=2.0,
              maxBatchTokens=50)
    assert s.add("long", now=0.0, known=300, limit=400).level == 0  # its first chunk: 0.6 s


def test_a_job_moves_down_once_it_used_its_quantum() -> None:
    s = sched(policy="mlfq", quantum=1.0, quantumRatio=2.0, maxBatch=1)
    s.add("a", now=0.0, known=10, limit=100)
    s.add("b", now=0.5, known=10, limit=100)
    step = s.decide(now=1.0)
    assert step.run == (("a", 10),)
    s.account(step, seconds=0.6, now=1.6)
    s.generated("a")
    assert s.jobs["a"].level == 0
    s.account(s.decide(now=1.6), seconds=0.6, now=2.2)  # a again: 1.2 s at level 0
    s.generated("a")
    assert s.jobs["a"].level == 1 and s.jobs["a"].served == 0.0
    assert s.decide(now=2.2).run == (("b", 10),)  # a is preempted
    assert s.counters.preemptions == 1 and s.counters.demotions == 1


def test_a_job_that_starved_goes_back_to_the_top() -> None:
    s = sched(policy="mlfq", quantum=1.0, starvation=5.0, maxBatch=1)
    s.add("old", now=0.0, known=10, limit=100)
    s.jobs["old"].level = 3
    s.add("new", now=1.0, known=10, limit=100)
    assert s.decide(now=4.9).run[0][0] == "new"
    assert s.decide(now=5.0).run[0][0] == "old"  # 5 s without running: level 0, earlier arrival
    assert s.jobs["old"].level == 0 and s.counters.promotions == 1


def test_fcfs_runs_started_jobs_then_arrivals_under_the_token_budget() -> None:
    s = sched(policy="fcfs", maxBatch=3, maxBatchTokens=20)
    s.add("a", now=0.0, known=8, limit=100)
    step = s.decide(now=0.0)
    s.account(step, 0.1, now=0.1)
    s.generated("a")
    s.add("c", now=0.3, known=30, limit=100)
    s.add("b", now=0.2, known=30, limit=100)
    # a decodes (1 token); b takes the 19 left; c waits for the budget
    assert s.decide(now=0.4).run == (("a", 1), ("b", 19))


def test_run_to_completion_runs_one_job_until_it_leaves() -> None:
    s = sched(policy="run-to-completion", maxBatch=8)
    s.add("a", now=0.0, known=5, limit=100)
    s.add("b", now=0.1, known=5, limit=100)
    for t in range(5):
        step = s.decide(now=float(t))
        assert [j for j, _ in step.run] == ["a"]
        s.account(step, 0.1, now=t + 0.1)
        s.generated("a")
    s.remove("a")
    assert [j for j, _ in s.decide(now=9.0).run] == ["b"]


def test_kv_caches_grow_by_doubling_up_to_the_limit() -> None:
    assert capacity_for(0, 10, 1000) == INITIAL_CAPACITY
    assert capacity_for(64, 65, 1000) == 128
    assert capacity_for(512, 900, 1000) == 1000
    assert capacity_for(128, 100, 1000) == 128


def test_admission_under_a_kv_budget_that_cannot_hold_everyone() -> None:
    s = sched(kv_tokens=250, policy="fcfs", maxBatch=8)
    for i, t in enumerate((0.0, 0.1, 0.2)):
        s.add(f"j{i}", now=t, known=60, limit=100)  # at most 100 positions each
    step = s.decide(now=0.3)
    assert [j for j, _ in step.run] == ["j0", "j1"]  # 200 of 250: j2 could not finish beside them
    s.account(step, 0.1, now=0.4)
    assert s.used == 128 and s.decide(now=0.4).run == ()  # nothing known to compute yet
    s.remove("j0")
    assert [j for j, _ in s.decide(now=0.5).run] == ["j2"]
    with pytest.raises(ValueError, match="never fits"):
        s.add("huge", now=1.0, known=10, limit=251)


def test_the_victim_of_memory_pressure_is_the_lowest_priority_holder() -> None:
    s = sched(kv_tokens=192, policy="mlfq", maxBatch=1)
    for i in range(3):
        s.add(f"j{i}", now=float(i), known=60, limit=100)
        s.seed_cache(f"j{i}", 60)  # each holds 64 positions
        s.jobs[f"j{i}"].known += 1
    s.jobs["j0"].level = 2  # j0 moved down: the lowest priority now
    s.jobs["j1"].known += 10  # j1 (first now) needs 71 positions
    step = s.decide(now=3.0)
    assert step == Step(run=(("j1", 11),), drop=("j0",))


def test_held_jobs_do_not_start_but_started_ones_go_on() -> None:
    s = sched(policy="fcfs")
    s.add("a", now=0.0, known=5, limit=100)
    s.account(s.decide(now=0.0), 0.1, now=0.1)
    s.generated("a")
    s.add("b", now=0.2, known=5, limit=100)
    s.jobs["b"].held = s.jobs["a"].held = True
    assert s.decide(now=0.3).run == (("a", 1),)


def test_the_manifest_validates_the_scheduling() -> None:
    assert Scheduling(quantum="50ms").quantum == 0.05
    assert Scheduling(policy="run-to-completion", maxBatch=16).batch == 1
    for bad in ({"policy": "lifo"}, {"maxBatch": 0}, {"quantum": "0s"}, {"quantumRatio": 0.5},
                {"typo": 1}):
        with pytest.raises(ValidationError):
            Scheduling(**bad)


def test_a_long_prefill_never_stalls_the_decodes_beside_it() -> None:
    """mlfq puts the new job first, yet the decodes after it keep their token (stall-free)."""
    s = sched(policy="mlfq", quantum=0.01, quantumRatio=10, maxBatch=4, maxBatchTokens=32)
    for j in ("a", "b"):
        s.add(j, now=0.0, known=4, limit=100)
    step = s.decide(now=0.0)
    s.account(step, seconds=0.1, now=0.1)  # both used level 0's quantum: level 1 now
    s.generated("a")
    s.generated("b")
    s.add("long", now=0.2, known=500, limit=600)
    s.jobs["long"].level = 0  # (whatever skip-join said) first in the order
    step = s.decide(now=0.2)
    assert step.run == (("long", 30), ("a", 1), ("b", 1))
