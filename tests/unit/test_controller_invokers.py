"""The controller's list of live invokers: callers that arrive while an etcd list is in flight
share its answer (controller/app.py ``Controller.list_invokers``), against a real etcd."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from controller.app import Controller, ControllerConfig
from sllm import keys
from sllm.etcd import Etcd
from sllm.messages import InvokerRecord


class GatedEtcd(Etcd):
    """A real etcd client whose invoker lists count themselves and wait for :attr:`gate`, so a
    test can gather callers while one list is in flight."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.gate = asyncio.Event()
        self.invoker_lists = 0

    async def list(self, kind: keys.Kind, model: Any) -> Any:
        if kind == keys.Kind.INVOKER:
            self.invoker_lists += 1
            await self.gate.wait()
        return await super().list(kind, model)


async def test_callers_during_a_list_share_it(etcd_endpoint: str) -> None:
    ctl = Controller(ControllerConfig(etcd_endpoint, lambda _: True, lambda _: 0,
                                      controller_id=f"c-{uuid.uuid4().hex[:6]}"))
    await ctl.etcd.close()
    ctl.etcd = etcd = GatedEtcd(etcd_endpoint)
    rec = InvokerRecord(id=f"inv-{uuid.uuid4().hex[:8]}", url="http://127.0.0.1:1", device="cpu",
                        memory_bytes=1 << 30, started=time.time(), pid=1)
    try:
        await etcd.put(keys.Kind.INVOKER, rec.id, rec)
        callers = [asyncio.create_task(ctl.list_invokers()) for _ in range(5)]
        await asyncio.sleep(0.05)
        callers[0].cancel()  # one caller gives up: the others still get the list
        etcd.gate.set()
        answers = await asyncio.gather(*callers[1:])
        assert etcd.invoker_lists == 1
        assert all(rec.id in {i.id for i in a} for a in answers)
        assert callers[0].cancelled()
        await ctl.list_invokers()  # a caller after the list ended lists afresh
        assert etcd.invoker_lists == 2
    finally:
        await etcd.delete(keys.Kind.INVOKER, rec.id)
        await etcd.close()
