"""The tiers a checkpoint is read from (ServerlessLLM, OSDI'24 §4: the multi-tier loader), one
vocabulary for the loader, the invokers' records, placement and the API.

- ``dram``: the invoker's DRAM pool caches it (a load maps it, nothing is read from disk);
- ``ssd``: the invoker's local store holds it (a load reads it);
- ``remote``: no local copy (a load first copies it from a peer invoker or the store root).
"""

from __future__ import annotations

from typing import Literal

Tier = Literal["dram", "ssd", "remote"]
"""Where a load reads a checkpoint from."""

LocalTier = Literal["dram", "ssd"]
"""Where a checkpoint sits on an invoker (``remote`` is the absence of a local copy)."""

TIERS: tuple[Tier, ...] = ("dram", "ssd", "remote")
"""Fastest first: a tier's index is its rank."""

TIER_RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}
"""Tier -> its rank in :data:`TIERS` (0 fastest)."""
