"""The scheduling part of ``python -m bench.engine``: a slice of the production trace replayed
through the running runtime on one SmolLM2 instance, for every policy on the same arrivals.

Workload. ``--sched-requests`` consecutive requests of the Azure conversation trace (from its
start), token counts divided by ``--sched-divide`` (:func:`bench.engine.workload.scaled`), so a
request takes a second or two here. Each prompt is exactly that many tokens: words of a fixed
list, one token each, the request's index first (:func:`prompt_text`: no two prompts of a
length alike, so the engine's sharing of equal prompts never applies), sent as raw text; each
request generates exactly its output length (``max_tokens``, ``ignore_eos``); both are checked
against the call's usage and tokens.

Load. The instance's capacity is measured first, in the same run, through the runtime: every
request of the slice sent at once to an fcfs instance; capacity = the completions between the
first and the third quarter of them over the time between (requests per second: the saturated
rate, without the ramp-up and the tail of a draining batch, :func:`capacity_rps`). Arrivals are
then the trace's, stretched so the mean rate is ``load x capacity``, for each load of
``--sched-loads``.

Each policy gets its own function (one instance, ``targetConcurrency`` above the slice's size so
the controller never queues: the instance's engine does all the scheduling; ``maxBatch``
:data:`BATCH`, memory 2 GiB: the KV budget holds every request). Per request, at the client:
TTFT (its arrival to its first token) and JCT (arrival to its last token), seconds. Run-to-completion cannot keep
up with these loads; its replay stops ``--sched-deadline`` seconds after the last arrival, and a
request not done by then counts with the time it had waited (``unfinished`` says how many: its
means are then lower bounds; their calls are closed, which cancels them in the engine).

Targets (issue 26), at the highest load: mlfq's p99 TTFT <= 0.5x fcfs's at a mean JCT <= 1.5x
fcfs's; both batching policies' mean JCT >= 10x better than run-to-completion's. With 60
requests (the default, which keeps the whole benchmark near 10 minutes here), p99 is the
slowest request; run-to-completion's queue, and
so its JCT, grows with the replay's length, and its deadline bounds both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.engine import workload
from bench.engine.serving import deploy, runtime
from sllm.sse import aparse_events

WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "in",
         "red", "blue", "green", "sun", "moon", "star", "tree", "river")
"""Common words, one token each in SmolLM2's tokenizer, first or after a space."""

BATCH = 8
"""``maxBatch`` of the batching policies' instances (the demo function's): fewer than the
sequences an instance holds at the busiest moments of the replay, so the policy decides who
runs."""


def prompt_text(index: int, tokens: int) -> str:
    """``tokens`` words of :data:`WORDS` (as many tokens, at least 1): the digits of ``index``
    in base ``len(WORDS) - 1`` as the words after the first, lowest first, then the first word
    (an end mark), then the list from ``index`` on; so prompts of one length differ when they
    are longer than their indices' digits."""
    digits, base = [], len(WORDS) - 1
    while True:
        index, d = divmod(index, base)
        digits.append(1 + d)
        if not index:
            break
    n = max(1, tokens)
    words = [*digits, 0, *((digits[0] + k) % len(WORDS) for k in range(n))][:n]
    return " ".join(WORDS[w] for w in words)


def capacity_rps(ends: Sequence[float]) -> float:
    """A burst's saturated rate: of ``ends``, the times (seconds from the burst's start) its
    requests completed, in any order, the completions between the first quarter's and the third
    quarter's over the time between (requests per second)."""
    t = sorted(ends)
    lo, hi = len(t) // 4, (3 * len(t)) // 4
    if hi <= lo or t[hi] <= t[lo]:
        raise ValueError(f"too few completions to rate: {len(t)}")
    return (hi - lo) / (t[hi] - t[lo])


@dataclass(frozen=True)
class Outcome:
    """One request's times at the client (seconds from its arrival); ``done`` False when the
    replay's deadline came first (``jct`` is then the time it had waited)."""

    ttft: float
    jct: float
    done: bool


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The row's numbers: mean and p99 JCT and TTFT (seconds), requests, unfinished."""
    jct = np.array([o.jct for o in outcomes])
    ttft = np.array([o.ttft for o in outcomes])
    return {"requests": len(outcomes), "jct_mean_s": float(jct.mean()),
            "jct_p99_s": float(np.percentile(jct, 99)), "ttft_mean_s": float(ttft.mean()),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "unfinished": sum(not o.done for o in outcomes)}


async def replay(gateway: str, function: str, requests: Sequence[workload.Request], *,
                 deadline_s: float | None = None) -> list[Outcome]:
    """Send each request at its arrival (seconds from now) and time it (module docstring).

    Raises:
        RuntimeError: a call failed, or its prompt or output was not as long as asked.
    """
    url = f"{gateway}/v1/functions/{function}/invoke"
    t0 = time.monotonic() + 0.5
    end = None if deadline_s is None else t0 + requests[-1].arrival + deadline_s
    limits = httpx.Limits(max_connections=len(requests) + 4)

    async def one(i: int, req: workload.Request, client: httpx.AsyncClient) -> Outcome:
        at = t0 + req.arrival
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        body = {"prompt": prompt_text(i, req.prompt), "raw": True, "max_tokens": req.output,
                "ignore_eos": True, "stream": True}
        first: float | None = None
        tokens = 0
        usage: dict[str, Any] = {}
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"invoke failed: {r.status_code} {(await r.aread())!r}")
            async for event, data in aparse_events(r.aiter_lines()):
                if event == "token":
                    first = first or time.monotonic()
                    tokens += 1
                elif event == "done":
                    usage = data["usage"]
                elif event == "error":
                    raise RuntimeError(f"stream error: {data}")
        now = time.monotonic()
        if (tokens, usage.get("prompt_tokens")) != (req.output, req.prompt):
            raise RuntimeError(f"request {i}: {tokens} tokens of a {usage.get('prompt_tokens')}"
                               f"-token prompt, not {req.output} of {req.prompt}")
        return Outcome(ttft=(first or now) - at, jct=now - at, done=True)

    async def bounded(i: int, req: workload.Request, client: httpx.AsyncClient) -> Outcome:
        if end is None:
            return await one(i, req, client)
        try:
            return await asyncio.wait_for(one(i, req, client), max(0.0, end - time.monotonic()))
        except TimeoutError:
            waited = time.monotonic() - (t0 + req.arrival)
            return Outcome(ttft=waited, jct=waited, done=False)

    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        return list(await asyncio.gather(*(bounded(i, r, client)
                                           for i, r in enumerate(requests))))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The part's rows: per load, per policy (module docstring); also a ``capacity`` row."""
    raw = workload.read_trace(args.trace)[: args.sched_requests]
    unit = workload.scaled(raw, divide=args.sched_divide, context=2048, load=1.0,
                           capacity_rps=1.0)
    burst = [workload.Request(0.0, r.prompt, r.output) for r in unit]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sllm-bench-sched-") as tmp, \
            runtime(Path(tmp)) as gw:
        for policy in args.policies:
            deploy(gw, f"sched-{policy}", args.model, policy,
                   BATCH if policy != "run-to-completion" else 1,
                   max(r.output for r in unit), target=len(unit) + 8)
            asyncio.run(replay(gw, f"sched-{policy}", burst[:1]))  # its cold start
        out = asyncio.run(replay(gw, "sched-fcfs", burst))
        capacity = capacity_rps([o.jct for o in out])
        rows.append({"part": "scheduling", "workload": "capacity", "policy": "fcfs",
                     "capacity_rps": capacity, "requests": len(burst),
                     "prompt_mean": float(np.mean([r.prompt for r in unit])),
                     "output_mean": float(np.mean([r.output for r in unit]))})
        if not args.json:
            print(json.dumps(rows[-1]), flush=True)
        for load in args.sched_loads:
            trace = workload.scaled(raw, divide=args.sched_divide, context=2048, load=load,
                                    capacity_rps=capacity)
            for policy in args.policies:
                deadline = args.sched_deadline if policy == "run-to-completion" else None
                out = asyncio.run(replay(gw, f"sched-{policy}", trace, deadline_s=deadline))
                rows.append({"part": "scheduling", "workload": "trace", "policy": policy,
                             "load": load, **summary(out)})
                if not args.json:
                    print(json.dumps(rows[-1]), flush=True)
    return rows
