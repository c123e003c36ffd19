"""Helpers for the instance pool's tests (controller.instances): invoker records and instances made
by hand."""

from __future__ import annotations

import asyncio

from controller.instances import InstancePool, LiveInstance
from sllm.messages import (
    BandwidthRecord,
    InstanceRecord,
    InvokerRecord,
    LoadRequest,
    LoadResponse,
    MigrateRequest,
    MigrateResponse,
)
from sllm.states import InstanceState as S

GIB = 1 << 30


class SilentInvokers:
    """Invokers that never answer: every call waits until it is cancelled (closing the pool
    cancels its background work). For tests of the pool's decisions in memory, whose loads
    must not end (nor fail) under them."""

    async def _forever(self) -> None:
        await asyncio.Event().wait()

    async def load(self, invoker_url: str, request: LoadRequest) -> LoadResponse:
        await self._forever()
        raise AssertionError("unreachable")

    async def unload(self, invoker_url: str, instance_id: str) -> None:
        await self._forever()

    async def migrate(self, invoker_url: str, instance_id: str, request: MigrateRequest
                      ) -> MigrateResponse:
        await self._forever()
        raise AssertionError("unreachable")

    async def healthy(self, invoker_url: str, timeout_s: float = 1.0) -> bool:
        await self._forever()
        raise AssertionError("unreachable")


async def no_invokers() -> list[InvokerRecord]:
    """An invoker listing for pools whose tests never place through ``start_instance``."""
    return []


def invoker(inv_id: str, *, memory: int = 2 * GIB, unit: int = GIB, device: str = "cpu"
            ) -> InvokerRecord:
    """A live invoker ``inv_id`` at ``http://<inv_id>`` running instances on ``device``, with
    ``memory`` bytes for instances and measured bandwidths of 10 ``unit``/s (DRAM), 2 (SSD) and
    1 (network)."""
    return InvokerRecord(id=inv_id, url=f"http://{inv_id}", device=device, memory_bytes=memory,
                         started=0.0, pid=1, bandwidths=BandwidthRecord(
                             dram_bps=10 * unit, ssd_bps=2 * unit, network_bps=unit))


def add(pool: InstancePool, iid: str, function: str, model: str, inv_id: str,
        state: S = S.ACTIVE, *, memory: int = GIB, in_flight: int = 0, nbytes: int = GIB
        ) -> LiveInstance:
    """Put instance ``iid`` of ``function`` (``model``, ``memory`` bytes, ``nbytes`` of
    checkpoint) on invoker ``inv_id`` into ``pool``, in ``state`` with ``in_flight`` calls;
    last used at 1.0 s (unix), 100 tokens at most per call."""
    live = LiveInstance(
        record=InstanceRecord(id=iid, function=function, model=model, invoker_id=inv_id,
                              invoker_url=f"http://{inv_id}", state=state, created=0.0,
                              memory_bytes=memory, last_used=1.0),
        in_flight=in_flight, max_tokens=100, nbytes=nbytes)
    pool.table.instances[iid] = live
    return live
