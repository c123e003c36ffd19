"""Startup-time estimation: how long a new instance would take to be ready on each invoker.

ServerlessLLM (Fu et al., OSDI'24, §6, "startup-time-optimized model scheduling") places a model
on the server where it would start soonest, estimating for each server:

    startup = queueing + loading + migration

- **queueing**: the time the loads already queued on that invoker still need (they share its
  disk and memory bandwidth, so a new load waits for them);
- **loading**: checkpoint size / bandwidth of the fastest tier that holds the checkpoint there:
  the DRAM tier, the local SSD, or, with no local copy, a copy from elsewhere (another invoker or
  the store root) over the network followed by the SSD load;
- **migration**: when the invoker must first be freed by moving a running inference away, the
  token-based migration cost ``a * tokens + b`` (§5) plus the destination's own load time.

Bandwidths are the invoker's own measurements (published with its record), never constants;
each invoker's are turned once into seconds per checkpoint byte per tier
(:func:`seconds_per_byte`). :func:`startup_s` is the estimate: placement
(:func:`controller.placement.place`) calls it for every candidate of a decision (a float
expression and a call, since a decision over 1,000 invokers must take under 1 ms) and
:func:`estimate` for the ones it keeps; :func:`choose`, the worked example below, uses the same
two. This module is pure: it takes plain data and returns estimates.

Worked example (the test ``test_worked_example``): a 1 GB checkpoint. Invoker A holds it in DRAM
(10 GB/s) but has one load of 2 s queued: 2 + 0.1 = 2.1 s. Invoker B holds it on SSD (2 GB/s),
idle: 0 + 0.5 = 0.5 s. Invoker C has no copy (network 1 GB/s, SSD 2 GB/s): 1 + 0.5 = 1.5 s.
B is chosen. Had A no queue, A (0.1 s) would win.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sllm.tiers import TIER_RANK, TIERS, Tier


@dataclass(frozen=True)
class Bandwidths:
    """One invoker's measured bandwidths, bytes per second."""

    dram_bps: float  # DRAM tier to usable weights
    ssd_bps: float  # local SSD to memory
    network_bps: float  # a checkpoint copy from another invoker or the store root


def seconds_per_byte(bw: Bandwidths) -> tuple[float, float, float]:
    """Seconds to load one checkpoint byte from each tier, in :data:`sllm.tiers.TIERS` order:
    DRAM and SSD at their bandwidth; ``remote`` is a copy over the network and then an SSD load.

    Raises:
        ValueError: a bandwidth is not positive.
    """
    ssd = 1 / _positive(bw.ssd_bps, "ssd_bps")
    return 1 / _positive(bw.dram_bps, "dram_bps"), ssd, 1 / _positive(bw.network_bps, "network_bps") + ssd


@dataclass(frozen=True)
class MigrationCost:
    """Token-based live migration time, ``per_token_s * tokens + fixed_s`` (ServerlessLLM §5-6):
    the destination recomputes the KV cache of the tokens moved, plus a fixed handoff cost.
    ``dest_load_s`` is the time the destination needs to load the migrated model first."""

    per_token_s: float
    fixed_s: float
    dest_load_s: float = 0.0

    def seconds(self, tokens: int) -> float:
        return self.per_token_s * tokens + self.fixed_s + self.dest_load_s


def startup_s(queue_s: float, nbytes: int, seconds_per_byte: float,
              migration_s: float = 0.0) -> float:
    """The startup estimate of a checkpoint of ``nbytes`` bytes on one candidate, seconds:
    ``queue_s`` behind the loads queued there, ``nbytes * seconds_per_byte`` to load it from
    the tier it would read (:func:`seconds_per_byte`), ``migration_s`` to move running
    inferences away first."""
    return queue_s + nbytes * seconds_per_byte + migration_s


@dataclass(frozen=True)
class Estimate:
    """The estimated startup time of a new instance on one invoker, and its parts (seconds)."""

    invoker_id: str
    tier: Tier
    queue_s: float
    load_s: float
    migration_s: float
    evicts: bool = False  # idle instances must be unloaded there first
    migrates: bool = False  # running instances must be migrated away first

    @property
    def total_s(self) -> float:
        return self.queue_s + self.load_s + self.migration_s

    def brief(self) -> str:
        """One line for logs, e.g. ``invoker-1 dram 1.310 s (queue 1.270 s, evicts)``."""
        parts = [f"queue {self.queue_s:.3f} s"] if self.queue_s > 0 else []
        if self.migration_s > 0:
            parts.append(f"migration {self.migration_s:.3f} s")
        parts += [w for w, on in (("evicts", self.evicts), ("migrates", self.migrates)) if on]
        return f"{self.invoker_id} {self.tier} {self.total_s:.3f} s" + (
            f" ({', '.join(parts)})" if parts else "")


def estimate(invoker_id: str, rank: int, queue_s: float, nbytes: int, seconds_per_byte: float,
             migration_s: float = 0.0, *, evicts: bool = False, migrates: bool = False
             ) -> Estimate:
    """:func:`startup_s` part by part, for the invoker ``invoker_id`` loading from the tier of
    rank ``rank`` (:data:`sllm.tiers.TIERS`); its ``total_s`` equals :func:`startup_s`."""
    return Estimate(invoker_id, TIERS[rank], queue_s, nbytes * seconds_per_byte, migration_s,
                    evicts, migrates)


@dataclass(frozen=True)
class Candidate:
    """One invoker as a possible home for a new instance (for :func:`choose`).

    Attributes:
        invoker_id: the invoker.
        tier: the fastest tier holding the checkpoint there (``remote``: no local copy).
        bandwidths: its measured bandwidths.
        queued_seconds: estimated time the loads already queued on it still need.
        migration_tokens: tokens (prompt + generated) of the inference that would have to be
            migrated away to make room; None when it has room without migrating.
    """

    invoker_id: str
    tier: Tier
    bandwidths: Bandwidths
    queued_seconds: float = 0.0
    migration_tokens: int | None = None


def choose(
    candidates: Sequence[Candidate], nbytes: int, migration: MigrationCost | None = None
) -> tuple[Estimate | None, list[Estimate]]:
    """Every candidate's estimate (:func:`startup_s`), smallest first, and the chosen one
    (None without candidates). Ties go to the faster tier, then the lower invoker id, so the
    choice is deterministic.

    Raises:
        ValueError: a candidate needs a migration but no ``migration`` cost is given, or a
            bandwidth is not positive.
    """
    if any(c.migration_tokens is not None for c in candidates) and migration is None:
        raise ValueError("a candidate needs a migration but no migration cost was given")
    ranked = []
    for c in candidates:
        rank = TIER_RANK[c.tier]
        queue_s = max(0.0, c.queued_seconds)
        spb = seconds_per_byte(c.bandwidths)[rank]
        mig_s = (0.0 if c.migration_tokens is None or migration is None
                 else migration.seconds(c.migration_tokens))
        ranked.append((startup_s(queue_s, nbytes, spb, mig_s), rank, c.invoker_id,
                       estimate(c.invoker_id, rank, queue_s, nbytes, spb, mig_s)))
    estimates = [r[3] for r in sorted(ranked, key=lambda r: r[:3])]
    return (estimates[0] if estimates else None), estimates


def _positive(v: float, name: str) -> float:
    if not v > 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v
