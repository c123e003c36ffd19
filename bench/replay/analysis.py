"""What a cluster replay's figures are made of: each invocation as the client saw it
(:class:`Result`), what the controller's log says (why instances stopped, how long placement
decisions took, checkpoints copied ahead), the cause of each cold start (:func:`classify`) and
one run's summary row (:func:`summarize`), with where the slowest invocations' time went.

The causes and the row's figures are described in :mod:`bench.replay.__main__`
(``python -m bench.replay --help``). Times are seconds unless a name says ``_ms``.
"""

from __future__ import annotations

import contextlib
import heapq
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import pct
from bench.workload import Arrival


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


def classify(results: list[Result], reasons: dict[str, str], keep_alive: float) -> list[str]:
    """The cause of each successful cold start (see :mod:`bench.replay.__main__`), in send
    order."""
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
