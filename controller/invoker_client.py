"""The controller's HTTP client for invokers: load, migrate and unload instances, and copy
checkpoints ahead of need."""

from __future__ import annotations

import logging
from typing import TypeVar

import httpx
from pydantic import BaseModel

from sllm.errors import InvokerError
from sllm.http import raise_for_error
from sllm.messages import (
    LoadRequest,
    LoadResponse,
    MigrateRequest,
    MigrateResponse,
    ReplicateRequest,
    ReplicateResponse,
    ReplicationPaused,
)
from sllm.routes import HEALTH, path
from sllm.routes import Invoker as R

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

LOAD_TIMEOUT_S = 600.0
"""Seconds a load may take before the controller gives up on it."""

KEEPALIVE_S = 2.0
"""Seconds an idle connection to an invoker is kept for reuse (below the server's 5 s)."""


class InvokerClient:
    """Calls invokers' management API. One shared connection pool for all invokers."""

    def __init__(self) -> None:
        # idle connections are dropped before the invokers' servers drop them (uvicorn: 5 s),
        # so a request never goes out on a connection the server is closing
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=LOAD_TIMEOUT_S),
                                       limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S))

    async def close(self) -> None:
        await self._http.aclose()

    async def load(self, invoker_url: str, request: LoadRequest) -> LoadResponse:
        """Have the invoker load an instance; returns when it is ready to serve.

        Raises:
            sllm.errors.SllmError: what the invoker raised (ModelNotFound, CheckpointError, ...).
            InvokerError: the invoker is unreachable or answered nonsense.
        """
        body = request.model_dump()
        try:
            try:
                r = await self._http.post(invoker_url + R.INSTANCES, json=body)
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
                # a connection that broke under the request: loads are idempotent per instance
                # id (the invoker joins one in progress), so sending it again is safe
                log.info("load of %s on %s: %r; sending it again", request.instance_id, invoker_url, e)
                r = await self._http.post(invoker_url + R.INSTANCES, json=body)
        except httpx.HTTPError as e:
            raise InvokerError(f"invoker at {invoker_url} failed to load: {e!r}") from e
        return _answer(r, LoadResponse, invoker_url, "load")

    async def migrate(self, invoker_url: str, instance_id: str, request: MigrateRequest
                      ) -> MigrateResponse:
        """Have the source invoker move an instance's generations to another instance; returns
        once each has handed over or finished (:mod:`invoker.migration`).

        Raises:
            sllm.errors.SllmError: what the invoker raised (InstanceNotFound, Conflict,
                MigrationFailed).
            InvokerError: the invoker is unreachable or answered nonsense.
        """
        return await self._call("POST", invoker_url, path(R.MIGRATE, id=instance_id),
                                request, MigrateResponse, "migrate")

    async def replicate(self, invoker_url: str, model: str, sources: list[str]) -> ReplicateResponse:
        """Have the invoker fetch a copy of ``model``'s checkpoint into its store (from
        ``sources``, peer invokers' URLs in order, then its store root); returns once the copy
        is complete (at once when it was current already).

        Raises:
            sllm.errors.SllmError: what the invoker raised (ModelNotFound, CheckpointError,
                Unavailable).
            InvokerError: the invoker is unreachable or answered nonsense.
        """
        return await self._call("PUT", invoker_url, path(R.CHECKPOINT, model=model),
                                ReplicateRequest(sources=sources), ReplicateResponse, "replicate")

    async def pause_replication(self, invoker_url: str, model: str) -> bool:
        """Have the invoker pause its replication of ``model`` (its partial data is kept; the
        waiting :meth:`replicate` raises Unavailable). Returns whether one was running and is
        paused now (False: none was, or a load waits on that fetch).

        Raises:
            sllm.errors.SllmError: what the invoker raised (InvalidRequest for a bad name).
            InvokerError: the invoker is unreachable or answered nonsense.
        """
        try:
            r = await self._http.delete(invoker_url + path(R.REPLICATION, model=model))
        except httpx.HTTPError as e:
            raise InvokerError(f"invoker at {invoker_url} failed to pause a replication: {e!r}"
                               ) from e
        return _answer(r, ReplicationPaused, invoker_url, "pause a replication").paused

    async def _call(self, method: str, invoker_url: str, path: str, body: BaseModel,
                    answer: type[M], what: str) -> M:
        """Send ``body`` as JSON; the answer parsed as ``answer`` (see :func:`_answer`)."""
        try:
            r = await self._http.request(method, f"{invoker_url}{path}", json=body.model_dump())
        except httpx.HTTPError as e:
            raise InvokerError(f"invoker at {invoker_url} failed to {what}: {e!r}") from e
        return _answer(r, answer, invoker_url, what)

    async def unload(self, invoker_url: str, instance_id: str) -> None:
        """Have the invoker unload an instance. An instance it no longer has is not an error.

        Raises:
            InvokerError: the invoker is unreachable.
        """
        try:
            r = await self._http.delete(invoker_url + path(R.INSTANCE, id=instance_id))
        except httpx.HTTPError as e:
            raise InvokerError(f"invoker at {invoker_url} failed to unload: {e!r}") from e
        if r.status_code != 404:
            raise_for_error(r)

    async def healthy(self, invoker_url: str, timeout_s: float = 1.0) -> bool:
        """Whether the invoker answers its health check within ``timeout_s`` seconds."""
        try:
            r = await self._http.get(invoker_url + HEALTH, timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def list_instances(self, invoker_url: str) -> list[str]:
        """Ids of the instances an invoker has loaded. Raises InvokerError when unreachable."""
        try:
            r = await self._http.get(invoker_url + R.INSTANCES)
        except httpx.HTTPError as e:
            raise InvokerError(f"invoker at {invoker_url} is unreachable: {e!r}") from e
        raise_for_error(r)
        try:
            return [str(i["instance_id"]) for i in r.json()["instances"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InvokerError(f"invoker at {invoker_url} answered a bad instance list") from e


def _answer(r: httpx.Response, model: type[M], invoker_url: str, what: str) -> M:
    """An invoker's answer as ``model``: its error raised (raise_for_error), or InvokerError
    when the body does not parse."""
    raise_for_error(r)
    try:
        return model.model_validate_json(r.content)
    except ValueError as e:
        raise InvokerError(f"invoker at {invoker_url} answered a bad {what} response") from e
