"""The leader controller's instances, in layers that only import downwards:

- :mod:`~controller.instances.table`: the instance table (states, slots, the etcd flusher,
  change notification) and what the layers above share of the cluster (checkpoint tiers,
  invoker URLs, the last manifest per function);
- :mod:`~controller.instances.health`: invokers suspected dead, and the probe that finds them;
- :mod:`~controller.instances.lifecycle`: carrying out loads, unloads, stops and migrations;
- :mod:`~controller.instances.view`: the placement view built from the table;
- :mod:`~controller.instances.capacity`: deciding and reserving a cold start's room, in one
  step with no await, and live migration (ServerlessLLM §5-6);
- :mod:`~controller.instances.admission`: the data path (acquire and release, the bounded wait
  queue, fairness between functions);
- :mod:`~controller.instances.recovery`: rebuilding the table after a controller (re)starts.

:class:`InstancePool` wires them together for one leadership term.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from controller.instances.admission import Admission
from controller.instances.capacity import MIGRATION_MODES, Capacity, MigrationMode
from controller.instances.health import InvokerHealth, Prober
from controller.instances.lifecycle import InvokerCalls, Lifecycle
from controller.instances.recovery import adopt
from controller.instances.table import InstanceTable, LiveInstance, RecordStore
from controller.placement import Policy
from sllm.manifest import FunctionManifest, Scheduling
from sllm.messages import InstanceRecord, InvokerRecord


class Invokers(InvokerCalls, Prober, Protocol):
    """What the pool needs of the invokers' client (:class:`controller.invoker_client.InvokerClient`)."""


class InstancePool:
    """The parts above, for one leadership term. All run on one event loop.

    Args:
        etcd: the durable store (None: records are never written; decisions in memory only).
        invokers: the invokers' client.
        list_invokers: returns the live invokers (from etcd, or the last known list).
        model_bytes: checkpoint size of a model in the store root (bytes); raises ModelNotFound.
        policy: the placement policy (``ours`` unless comparing, see controller.placement).
        migration: what to do when room must be made from running instances
            (:mod:`~controller.instances.capacity`).
        manifest_of: a function's current manifest by name (to start a migration's
            destination); without it nothing migrates.
        clock: unix seconds; a parameter so tests can drive time.

    Attributes:
        table, health, lifecycle, capacity, admission: the layers.
    """

    def __init__(
        self, etcd: RecordStore | None, invokers: Invokers,
        list_invokers: Callable[[], Awaitable[list[InvokerRecord]]],
        model_bytes: Callable[[str], int], *, policy: Policy = "ours",
        migration: MigrationMode = "live",
        manifest_of: Callable[[str], Awaitable[FunctionManifest]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = InstanceTable(etcd, clock)
        self.health = InvokerHealth(self.table, invokers)
        self.lifecycle = Lifecycle(self.table, invokers)
        self.capacity = Capacity(self.table, self.lifecycle, self.health, list_invokers,
                                 model_bytes, lambda: self.admission.queued(), policy=policy,
                                 migration=migration, manifest_of=manifest_of)
        self.admission = Admission(self.table, self.capacity, self.lifecycle, self.health)

    def adopt(self, records: Iterable[InstanceRecord], reported: Mapping[str, set[str]],
              max_tokens: Mapping[str, int], scheduling: Mapping[str, Scheduling] | None = None
              ) -> list[tuple[str, str, str]]:
        """Rebuild the table after a controller (re)start (:func:`recovery.adopt`); returns the
        orphans to unload."""
        return adopt(self.table, self.lifecycle, records, reported, max_tokens, scheduling)

    async def close(self) -> None:
        """Stop (the controller stopped leading): background work is cancelled and every
        waiting acquire is sent away with NotLeader; nothing is unloaded."""
        await self.table.close()


__all__ = ["MIGRATION_MODES", "InstancePool", "Invokers", "LiveInstance", "MigrationMode"]
