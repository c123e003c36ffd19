"""The engine's scheduler over a whole trace, in simulated time: the real decision code
(:class:`invoker.engine.scheduler.Scheduler`, imported, not copied) driven by a per-iteration
cost model instead of a model's forward passes, so that comparisons too delicate for two shared
cores (19,366 requests, several loads, several policies) take seconds and are exact.

Each simulated iteration: the requests that arrived by ``now`` join; the scheduler decides; the
iteration lasts ``cost.seconds(step)``; the scheduler accounts it; each job whose chunk reached
its last known position samples a token (its first one is its TTFT; its last one ends it, JCT).
``srpt`` is an oracle that knows every job's output length and runs the jobs with the fewest
tokens left first (preemptive, at iteration boundaries): the bound for mean JCT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.engine.workload import Request
from invoker.engine.scheduler import Job, Scheduler, Step
from sllm.manifest import Scheduling


@dataclass(frozen=True)
class Cost:
    """One iteration's time: ``fixed_s + prefill_s * prefill tokens + decode_s * decodes``
    (seconds); a decode is a job computing the one token it sampled last."""

    fixed_s: float
    prefill_s: float
    decode_s: float
    name: str = ""

    def seconds(self, prefill_tokens: int, decodes: int) -> float:
        return self.fixed_s + self.prefill_s * prefill_tokens + self.decode_s * decodes

    def capacity_rps(self, requests: list[Request], batch: int) -> float:
        """Requests per second one instance serves at saturation (every iteration a full batch
        of decodes, prefills added to them): the load's unit."""
        prompt = float(np.mean([r.prompt for r in requests]))
        output = float(np.mean([r.output for r in requests]))
        per_request = output * (self.fixed_s / batch + self.decode_s) + prompt * self.prefill_s
        return 1.0 / per_request


class Srpt(Scheduler):
    """The oracle: fewest output tokens left first (then arrival)."""

    def __init__(self, config: Scheduling, kv_tokens: int, left: dict[str, int]) -> None:
        super().__init__(config, kv_tokens)
        self._left = left

    def order(self, now: float) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: (self._left[j.id], j.arrival, j.id))


@dataclass
class Outcome:
    """Per request (in trace order): TTFT and JCT, seconds."""

    ttft: np.ndarray
    jct: np.ndarray
    iterations: int
    preemptions: int

    def row(self) -> dict[str, float]:
        return {"requests": len(self.jct), "jct_mean_s": float(self.jct.mean()),
                "jct_p99_s": float(np.percentile(self.jct, 99)),
                "ttft_mean_s": float(self.ttft.mean()),
                "ttft_p99_s": float(np.percentile(self.ttft, 99))}


def simulate(requests: list[Request], policy: str, cost: Cost, config: Scheduling,
             kv_tokens: int) -> Outcome:
    """Serve ``requests`` (arrival order) on one instance under ``policy`` (one of
    :data:`sllm.manifest.POLICIES`, or ``srpt``) with ``config``'s batch, token budget and MLFQ
    parameters; see the module docstring."""
    left = {str(i): r.output for i, r in enumerate(requests)}
    sched: Scheduler = (Srpt(config.model_copy(update={"policy": "fcfs"}), kv_tokens, left)
                        if policy == "srpt" else
                        Scheduler(config.model_copy(update={"policy": policy}), kv_tokens))
    n = len(requests)
    first = np.full(n, np.nan)
    end = np.full(n, np.nan)
    now, nxt, iterations = 0.0, 0, 0
    while nxt < n or sched.jobs:
        while nxt < n and requests[nxt].arrival <= now:
            r = requests[nxt]
            sched.add(str(nxt), now=r.arrival, known=r.prompt, limit=r.prompt + r.output)
            nxt += 1
        step: Step = sched.decide(now) if sched.jobs else Step(())
        if not step.run:
            now = max(now, requests[nxt].arrival) if nxt < n else now
            continue
        decodes = sum(1 for j, k in step.run if k == 1 and sched.jobs[j].started
                      and sched.jobs[j].pending == 1)
        prefill = sum(k for _, k in step.run) - decodes
        seconds = cost.seconds(prefill, decodes)
        sampled = [j for j, k in step.run if sched.jobs[j].computed + k == sched.jobs[j].known]
        now += seconds
        sched.account(step, seconds, now)
        iterations += 1
        for j in sampled:
            i = int(j)
            if np.isnan(first[i]):
                first[i] = now
            left[j] -= 1
            if left[j] == 0:
                end[i] = now
                sched.remove(j)
            else:
                sched.generated(j)
    arrivals = np.array([r.arrival for r in requests])
    return Outcome(first - arrivals, end - arrivals, iterations, sched.counters.preemptions)
