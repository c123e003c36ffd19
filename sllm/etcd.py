"""The one module that talks to etcd (through ``aetcd``, the maintained asyncio client).

Keys come from :mod:`sllm.keys`; values are the pydantic records of :mod:`sllm.messages`,
stored as JSON. Connection failures surface as :class:`~sllm.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import aetcd
import aetcd.exceptions
from pydantic import BaseModel

from sllm import keys
from sllm.errors import Unavailable

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)


def _key(kind: keys.Kind, name: str | tuple[str, ...]) -> str:
    return keys.key(kind, *name) if isinstance(name, tuple) else keys.key(kind, name)


@dataclass(frozen=True)
class Versioned(Generic[R]):
    """A record as stored, with what a compare-and-swap needs (:meth:`Etcd.get_versioned`)."""

    record: R
    mod_revision: int  # etcd's revision of the key's last write; :meth:`Etcd.replace` compares it
    lease: int  # the id of the lease the key is attached to, 0 for none


class Etcd:
    """An asyncio etcd client for sllm records.

    Args:
        endpoint: ``host:port`` of an etcd client URL.
        timeout: seconds for each call before it fails with :class:`Unavailable`.
    """

    def __init__(self, endpoint: str, *, timeout: float = 5.0) -> None:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        self.endpoint = endpoint
        self._client = aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await op()
        except aetcd.exceptions.ClientError as e:
            raise Unavailable(f"etcd at {self.endpoint} is unavailable: {e}", retry_after=1) from e

    async def put(self, kind: keys.Kind, name: str | tuple[str, ...], record: BaseModel, *,
                  lease: int | None = None) -> None:
        """Write ``record`` as JSON under the key of ``kind``/``name`` (attached to ``lease``);
        ``name`` is a tuple for kinds with several parts."""
        k = _key(kind, name).encode()
        v = record.model_dump_json().encode()
        await self._call(lambda: self._client.put(k, v, lease=lease))

    async def create(self, kind: keys.Kind, name: str, record: BaseModel, *,
                     lease: int | None = None) -> bool:
        """Write ``record`` only if the key does not exist yet (attached to ``lease`` when given).
        Returns whether it was written."""
        return await self._put_if(kind, name, record, lambda tx, k: tx.version(k) == 0, lease)

    async def replace(self, kind: keys.Kind, name: str, record: BaseModel, *, mod_revision: int,
                      lease: int | None = None) -> bool:
        """Compare-and-swap: overwrite the key with ``record`` (attached to ``lease``, which
        detaches it from its old lease) only if its last write is still ``mod_revision`` (from
        :meth:`get_versioned`). Returns whether it was written; False when the key changed or was
        deleted since it was read."""
        return await self._put_if(kind, name, record, lambda tx, k: tx.mod(k) == mod_revision,
                                  lease)

    async def _put_if(self, kind: keys.Kind, name: str, record: BaseModel,
                      condition: Callable[[Any, bytes], Any], lease: int | None) -> bool:
        """Write ``record`` in one transaction if ``condition(transactions, key)`` holds."""
        k = keys.key(kind, name).encode()
        v = record.model_dump_json().encode()
        tx = self._client.transactions

        async def op() -> bool:
            ok, _ = await self._client.transaction(
                compare=[condition(tx, k)], success=[tx.put(k, v, lease=lease)], failure=[])
            return bool(ok)

        return bool(await self._call(op))

    async def get(self, kind: keys.Kind, name: str | tuple[str, ...], model: type[R]) -> R | None:
        """The record under ``kind``/``name``, or None when absent."""
        k = _key(kind, name).encode()
        got = await self._call(lambda: self._client.get(k))
        return None if got is None else model.model_validate_json(got.value)

    async def get_versioned(self, kind: keys.Kind, name: str | tuple[str, ...],
                            model: type[R]) -> Versioned[R] | None:
        """Like :meth:`get`, with the key's mod revision and lease; None when absent."""
        k = _key(kind, name).encode()
        got = await self._call(lambda: self._client.get(k))
        if got is None:
            return None
        record = model.model_validate_json(got.value)
        return Versioned(record=record, mod_revision=int(got.mod_revision), lease=int(got.lease))

    async def list(self, kind: keys.Kind, model: type[R]) -> list[R]:
        """Every record of ``kind``, in key order. Records that fail to parse are skipped with a
        warning (a newer writer's format must not wedge an older reader)."""
        rng = await self._call(lambda: self._client.get_prefix(keys.prefix(kind).encode()))
        out: list[R] = []
        for kv in rng:
            try:
                out.append(model.model_validate_json(kv.value))
            except ValueError:
                log.warning("skipping unparsable etcd value at %s", kv.key)
        return out

    async def delete(self, kind: keys.Kind, name: str | tuple[str, ...]) -> bool:
        """Delete one key. Returns whether it existed."""
        k = _key(kind, name).encode()
        return bool(await self._call(lambda: self._client.delete(k)))

    async def grant_lease(self, ttl: int) -> int:
        """Grant a lease of ``ttl`` seconds; returns its id."""
        lease = await self._call(lambda: self._client.lease(ttl))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> bool:
        """Keep a lease alive for another TTL. Returns False when the lease has expired (etcd
        answers with TTL <= 0), so the holder must register again under a new lease."""
        reply = await self._call(lambda: self._client.refresh_lease(lease_id))
        return reply is not None and int(reply.TTL) > 0

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, deleting every key attached to it."""
        await self._call(lambda: self._client.revoke_lease(lease_id))

    async def keep_alive(
        self, lease_id: int, ttl: int, stop: asyncio.Event,
        on_expired: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        """Refresh ``lease_id`` every ``ttl / 3`` seconds until ``stop`` is set. Refresh failures
        (etcd briefly away) are logged and retried on the next beat; when the lease has expired,
        ``on_expired`` is awaited and must return the new lease id to keep alive."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.5, ttl / 3)):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                alive = await self.refresh_lease(lease_id)
                if not alive and on_expired is not None:
                    log.warning("lease %x expired; registering again", lease_id)
                    lease_id = await on_expired()
            except Unavailable as e:
                log.warning("lease %x refresh failed: %s", lease_id, e)
