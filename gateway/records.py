"""Activation records: what happened to each recent invocation, as OpenWhisk's activation list
shows (id, function, start, end, status, cold or warm, the instances it ran on, and for a
failure why).

The gateway keeps the last :data:`KEEP` records in memory (they are diagnostics, not data: a
restarted gateway starts a fresh list). Served at ``GET /v1/activations`` (newest first,
``?limit=N``) and ``GET /v1/activations/{id}``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sllm.errors import ActivationNotFound

KEEP = 1000
"""Records kept; the oldest goes first."""


class ActivationLog:
    """The most recent activation records, by id."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, record: dict[str, Any]) -> None:
        """Keep ``record`` (it must have an ``activation_id``), dropping the oldest past KEEP."""
        self._items[record["activation_id"]] = record
        self._items.move_to_end(record["activation_id"])
        while len(self._items) > self._keep:
            self._items.popitem(last=False)

    def get(self, activation_id: str) -> dict[str, Any]:
        """One record. Raises ActivationNotFound (404)."""
        record = self._items.get(activation_id)
        if record is None:
            raise ActivationNotFound(f"no record of activation {activation_id!r} (the gateway "
                                     f"keeps the last {self._keep})")
        return record

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` records, newest first."""
        return list(reversed(self._items.values()))[: max(0, limit)]


ACTIVATIONS = ActivationLog()
"""The gateway process's activation records."""
