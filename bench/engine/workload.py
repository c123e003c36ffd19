"""The engine benchmark's workloads: a production trace's arrivals and token counts, scaled to a
machine, and its heavy-tailed variant.

The trace (``../shared/traces/azure_llm_2023_conv.csv``, see its README) has one row per request:
``arrived_at`` (seconds), ``num_prefill_tokens``, ``num_decode_tokens``. :func:`scaled` divides
the token counts by ``divide`` (at least 1 token each), clips prompt + output to the context
window, and stretches time so that the offered load is ``load`` times a given capacity (requests
per second). :func:`heavy_tail` keeps the arrivals and prompts and draws output lengths from a
Pareto law with shape ``alpha``, scaled to the trace's mean output length and capped at the
context window.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
"""The Azure LLM conversation trace beside the repository (``../shared``)."""


@dataclass(frozen=True)
class Request:
    """One request: when it arrives (s), its prompt tokens and the tokens it generates."""

    arrival: float
    prompt: int
    output: int


def read_trace(path: Path = TRACE) -> list[Request]:
    """The trace's requests in arrival order.

    Raises:
        OSError: the file cannot be read; KeyError, ValueError: it lacks the columns.
    """
    with path.open(newline="") as f:
        rows = [Request(float(r["arrived_at"]), int(r["num_prefill_tokens"]),
                        int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: r.arrival)


def scaled(requests: list[Request], *, divide: float, context: int, load: float,
           capacity_rps: float) -> list[Request]:
    """Token counts divided by ``divide`` and clipped to ``context`` (prompt first, so at
    least one output token fits); arrivals stretched so that the request rate is ``load *
    capacity_rps`` per second on average."""
    span = requests[-1].arrival - requests[0].arrival
    stretch = (len(requests) / span) / (load * capacity_rps) if span > 0 else 1.0
    t0 = requests[0].arrival
    out = []
    for r in requests:
        prompt = min(max(1, round(r.prompt / divide)), context - 1)
        output = min(max(1, round(r.output / divide)), context - prompt)
        out.append(Request((r.arrival - t0) * stretch, prompt, output))
    return out


def heavy_tail(requests: list[Request], *, alpha: float, context: int, seed: int = 0
               ) -> list[Request]:
    """The same arrivals and prompts, output lengths ~ Pareto(``alpha``) with the trace's mean
    (before the cap at ``context`` - prompt, which lowers it a little)."""
    mean = float(np.mean([r.output for r in requests]))
    x_m = mean * (alpha - 1) / alpha  # a Pareto law's mean is alpha x_m / (alpha - 1)
    rng = np.random.default_rng(seed)
    draws = x_m * (1 + rng.pareto(alpha, len(requests)))
    return [replace(r, output=int(min(max(1, round(d)), context - r.prompt)))
            for r, d in zip(requests, draws, strict=True)]
