"""The gateway's clients for the components behind it: the controller (where to run an
invocation, function management) and invokers (the token stream, which never passes through the
controller).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from sllm.config import COLD_START_DEADLINE_S
from sllm.errors import InvokerError, SllmError, Unavailable
from sllm.http import raise_for_error
from sllm.messages import (
    STREAM_MESSAGE,
    AcquireRequest,
    Assignment,
    GenerateRequest,
    ReleaseRequest,
)

log = logging.getLogger(__name__)


class Upstream:
    """HTTP clients to the controller and to invokers, sharing one connection pool.

    Args:
        controller_url: ``http://host:port`` of the controller.
    """

    def __init__(self, controller_url: str) -> None:
        self.controller_url = controller_url.rstrip("/")
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=COLD_START_DEADLINE_S + 30.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._http.aclose()

    async def controller(self, method: str, path: str, *, json: Any = None) -> httpx.Response:
        """Call the controller; raises the error it answered, or Unavailable when it is down."""
        try:
            r = await self._http.request(method, f"{self.controller_url}{path}", json=json)
        except httpx.HTTPError as e:
            raise Unavailable(f"the controller is unreachable: {e!r}", retry_after=2) from e
        raise_for_error(r)
        return r

    async def acquire(self, function: str) -> Assignment:
        """Ask the controller for an instance slot (waits through a cold start)."""
        r = await self.controller("POST", "/v1/acquire", json=AcquireRequest(function=function).model_dump())
        return Assignment.model_validate_json(r.content)

    def release_soon(self, instance_id: str, stream: httpx.Response | None = None) -> None:
        """Close the invoker's token ``stream`` (which cancels its generation if still running)
        and give the slot back, in a task of its own: a request cancelled because its client
        went away can no longer await anything itself."""
        async def release() -> None:
            if stream is not None:
                await stream.aclose()
            try:
                await self.controller("POST", "/v1/release",
                                      json=ReleaseRequest(instance_id=instance_id).model_dump())
            except SllmError as e:
                log.warning("release of %s failed: %s", instance_id, e.message)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def open_stream(self, assignment: Assignment, request: GenerateRequest) -> httpx.Response:
        """Start a generation on the assigned instance. Returns the open streaming response
        (status 200); errors the invoker answers before streaming are raised here."""
        url = f"{assignment.invoker_url}/v1/instances/{assignment.instance_id}/generate"
        req = self._http.build_request("POST", url, json=request.model_dump(mode="json"))
        try:
            r = await self._http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise InvokerError(f"invoker at {assignment.invoker_url} is unreachable: {e!r}") from e
        if r.status_code != 200:
            await r.aread()
            await r.aclose()
            raise_for_error(r)
        return r

    @staticmethod
    async def messages(response: httpx.Response) -> AsyncIterator[Any]:
        """The invoker's stream messages (TokenMessage, DoneMessage, ErrorMessage), parsed.

        Raises:
            InvokerError: the connection broke or a line does not parse.
        """
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    yield STREAM_MESSAGE.validate_json(line)
        except httpx.HTTPError as e:
            raise InvokerError(f"the invoker's stream broke: {e!r}") from e
        except ValueError as e:
            raise InvokerError(f"the invoker sent a malformed stream message: {e}") from e
