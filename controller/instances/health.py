"""Invoker health: invokers a client could not reach are probed at once, and a dead one's
instances are marked lost then, not when its etcd lease expires (up to its TTL later).

An invoker found unreachable is *suspected*: left out of placement for :data:`SUSPECT_S`,
although its record is still in etcd. A dead invoker's lease expires meanwhile; one still
renewing after that is alive and placed again (a false alarm costs its instances, which the
controller's orphan sweep unloads).
"""

from __future__ import annotations

import logging
from typing import Protocol

from controller.instances.table import InstanceTable
from sllm.config import INVOKER_LEASE_TTL_S
from sllm.messages import InvokerRecord

log = logging.getLogger(__name__)

SUSPECT_S = 2.0 * INVOKER_LEASE_TTL_S
"""Seconds an invoker found unreachable is left out of placement (see the module docstring)."""


class Prober(Protocol):
    """What health needs of the invokers' client (:class:`controller.invoker_client.InvokerClient`)."""

    async def healthy(self, invoker_url: str, timeout_s: float = 1.0) -> bool: ...


class InvokerHealth:
    """Which invokers are suspected dead, and the probe that finds them.

    Args:
        table: the instances (a dead invoker's are marked lost there).
        prober: asks an invoker whether it is alive.
    """

    def __init__(self, table: InstanceTable, prober: Prober) -> None:
        self._table = table
        self._prober = prober
        self.dead: dict[str, float] = {}  # invoker id -> unix seconds it was found unreachable

    def suspected(self, invoker: InvokerRecord, now: float) -> bool:
        """Whether ``invoker`` was found unreachable since it (re)started, less than
        :data:`SUSPECT_S` before ``now`` (unix seconds)."""
        dead_at = self.dead.get(invoker.id)
        return dead_at is not None and dead_at >= invoker.started and now - dead_at < SUSPECT_S

    async def check(self, invoker_id: str, url: str, why: str) -> bool:
        """Probe an invoker a client could not reach (``why``); when it does not answer, mark
        its instances lost at once. Returns whether it is alive."""
        if await self._prober.healthy(url):
            return True
        self.dead[invoker_id] = self._table.clock()
        self._table.lose_invoker(invoker_id, f"invoker {invoker_id} unreachable: {why}")
        await self._table.notify()
        return False
