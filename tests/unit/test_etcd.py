"""The etcd layer against a real etcd server."""

from __future__ import annotations

import asyncio
import uuid

from sllm import keys
from sllm.etcd import Etcd
from sllm.messages import InvokerRecord


def rec(i: str) -> InvokerRecord:
    return InvokerRecord(id=i, url="http://x", device="cpu", memory_bytes=1, started=0.0, pid=1)


async def test_put_get_list_delete(etcd_endpoint: str) -> None:
    name = uuid.uuid4().hex
    async with Etcd(etcd_endpoint) as etcd:
        await etcd.put(keys.Kind.INVOKER, name, rec(name))
        assert await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) == rec(name)
        assert name in {r.id for r in await etcd.list(keys.Kind.INVOKER, InvokerRecord)}
        assert await etcd.delete(keys.Kind.INVOKER, name)
        assert await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) is None


async def test_create_refuses_an_existing_key(etcd_endpoint: str) -> None:
    name = uuid.uuid4().hex
    async with Etcd(etcd_endpoint) as etcd:
        assert await etcd.create(keys.Kind.INVOKER, name, rec(name))
        assert not await etcd.create(keys.Kind.INVOKER, name, rec("other"))
        assert (await etcd.get(keys.Kind.INVOKER, name, InvokerRecord)).id == name  # type: ignore[union-attr]


async def test_key_under_a_lease_disappears_when_it_expires(etcd_endpoint: str) -> None:
    name = uuid.uuid4().hex
    async with Etcd(etcd_endpoint) as etcd:
        lease = await etcd.grant_lease(1)
        await etcd.put(keys.Kind.INVOKER, name, rec(name), lease=lease)
        assert await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) is not None
        for _ in range(60):
            await asyncio.sleep(0.1)
            if await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) is None:
                break
        assert await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) is None
        assert not await etcd.refresh_lease(lease)


async def test_kept_alive_lease_outlives_its_ttl(etcd_endpoint: str) -> None:
    name = uuid.uuid4().hex
    async with Etcd(etcd_endpoint) as etcd:
        lease = await etcd.grant_lease(1)
        await etcd.put(keys.Kind.INVOKER, name, rec(name), lease=lease)
        stop = asyncio.Event()
        keeper = asyncio.create_task(etcd.keep_alive(lease, 1, stop))
        await asyncio.sleep(2.5)
        assert await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) is not None
        stop.set()
        await keeper
        await etcd.revoke_lease(lease)
        assert await etcd.get(keys.Kind.INVOKER, name, InvokerRecord) is None
