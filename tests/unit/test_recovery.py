"""A controller that takes over (controller.instances.recovery): a load left pending by the
last leader is sent again with its function's scheduling, not the default."""

from __future__ import annotations

import asyncio

from controller.instances import InstancePool
from sllm.etcd import Etcd
from sllm.manifest import Scheduling
from sllm.messages import InstanceRecord, LoadRequest, LoadResponse
from sllm.states import InstanceState as S
from tests.helpers.pools import GIB, SilentInvokers, invoker


class RecordingInvokers(SilentInvokers):
    def __init__(self) -> None:
        self.loads: list[LoadRequest] = []

    async def load(self, invoker_url: str, request: LoadRequest) -> LoadResponse:
        self.loads.append(request)
        return await super().load(invoker_url, request)


async def test_a_pending_load_is_sent_again_with_its_functions_scheduling(etcd: Etcd) -> None:
    invokers = RecordingInvokers()

    async def list_invokers() -> list:  # type: ignore[type-arg]
        return [invoker("a")]

    pool = InstancePool(etcd, invokers, list_invokers, lambda model: GIB)
    rec = InstanceRecord(id="f-1", function="f", model="fm", invoker_id="a",
                         invoker_url="http://a", state=S.LOADING, created=0.0, memory_bytes=GIB)
    wanted = Scheduling(policy="fcfs", maxBatch=4)
    try:
        pool.adopt([rec], {"a": set()}, {"f": 100}, {"f": wanted})
        for _ in range(200):
            if invokers.loads:
                break
            await asyncio.sleep(0.005)
        [load] = invokers.loads
        assert (load.instance_id, load.scheduling) == ("f-1", wanted)
    finally:
        await pool.close()
