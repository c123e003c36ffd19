"""The statistics and reporting helpers the benchmarks share: percentiles and medians of samples,
a bootstrap's resampled units and its 95% interval, text tables, and the machine a figure was
measured on.

Every helper answers NaN for an empty sample rather than raising, so a row with no successful
invocation still prints.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def pct(xs: Any, q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation) of ``xs``, any array-like of
    numbers of shape (n,); NaN when n = 0."""
    a = np.asarray(xs, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


def median(xs: Sequence[float]) -> float:
    """The median of ``xs`` (``statistics.median``: the mean of the middle two for an even
    count); NaN when empty."""
    return statistics.median(xs) if xs else float("nan")


def bootstrap_draws(units: int, resamples: int, seed: int) -> np.ndarray:
    """The units of a bootstrap: shape (resamples, units), each row ``units`` indices in
    [0, units) drawn with replacement from ``numpy.random.default_rng(seed)`` (same arguments,
    same draws)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, units, size=(resamples, units))


def ci95(samples: Iterable[float]) -> tuple[float, float]:
    """The 95% percentile interval (2.5th and 97.5th percentiles) of a bootstrap's statistics."""
    lo, hi = np.percentile(list(samples), [2.5, 97.5])
    return float(lo), float(hi)


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """Rows as a text table: ``cols`` are (header, key, format); a number is formatted with its
    column's format, anything else with ``str`` (a missing key is blank). The first column is
    left-aligned, the others right-aligned, under a line of dashes."""
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([format(r[k], f) if isinstance(r.get(k), int | float) else str(r.get(k, ""))
                      for _, k, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def memory_bytes() -> int:
    """The machine's physical memory (bytes; 0 where ``os.sysconf`` is missing)."""
    if not hasattr(os, "sysconf"):
        return 0
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine() -> dict[str, Any]:
    """What the figures were measured on: host name, platform, CPUs, memory (GB, 1e9 bytes),
    the Python and numpy versions."""
    return {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gb": round(memory_bytes() / 1e9, 1), "python": platform.python_version(),
            "numpy": np.__version__}
