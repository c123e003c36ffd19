"""One row of the output: a loader's (or a limit's) timed runs on one model, tier and cache
state, the limit it is compared with, and its JSON form.

``seconds`` is the median of the runs (:func:`bench.stats.median`), ``gbps`` the model's weight
bytes over it (GB/s, 1e9 bytes), ``pct`` that as a percentage of the limit's rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.stats import median


def _round4(x: float | None) -> float | None:
    """``x`` to 4 decimals; None stays None (JSON null)."""
    return None if x is None else round(x, 4)


@dataclass
class Row:
    """One line of the table (one JSON object with ``--json``)."""

    loader: str  # a loader's name, or "limit"
    tier: str  # "ssd", "dram", "page-cache" or "h2d"
    cache: str  # "cold", "warm" or "n/a"
    model: str
    nbytes: int  # bytes loaded (the model's weight bytes; a limit's bytes read)
    runs: list[float] = field(default_factory=list)  # seconds, one per timed load
    touches: list[float] = field(default_factory=list)  # seconds of each run spent touching
    note: str = ""
    limit: str = ""  # "fio", "memcpy" or "h2d"
    limit_bps: float = 0.0  # the limit's rate, bytes per second
    device: str = "cpu"

    @property
    def seconds(self) -> float | None:
        """The median run (seconds); None with no run."""
        return median(self.runs) if self.runs else None

    @property
    def gbps(self) -> float | None:
        """GB/s (1e9 bytes) of the median run; None with no run."""
        s = self.seconds
        return self.nbytes / s / 1e9 if s else None

    @property
    def pct(self) -> float | None:
        """``gbps`` as a percentage of the limit's rate; None without either."""
        g = self.gbps
        return 100 * g * 1e9 / self.limit_bps if g and self.limit_bps else None

    def as_json(self) -> dict[str, Any]:
        """The row as ``--json`` prints it (figures rounded to 4 decimals)."""
        return {
            "loader": self.loader, "tier": self.tier, "cache": self.cache, "model": self.model,
            "device": self.device, "bytes": self.nbytes, "seconds": _round4(self.seconds),
            "gbps": _round4(self.gbps),
            "limit": self.limit or None, "pct_of_limit": _round4(self.pct),
            "runs": [round(x, 4) for x in self.runs],
            "touch_seconds": _round4(median(self.touches)) if self.touches else None,
            "note": self.note,
        }
