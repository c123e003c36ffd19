"""The gateway's clients for the components behind it: the controller (where to run an
invocation, function management) and invokers (the token stream, which never passes through the
controller).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from sllm import routes
from sllm.config import COLD_START_DEADLINE_S, CONTROLLER_LEASE_TTL_S
from sllm.errors import (
    InvokerError,
    InvokerUnreachable,
    NotLeader,
    SllmError,
    StreamBroken,
    Unavailable,
)
from sllm.http import raise_for_error
from sllm.messages import (
    AcquireRequest,
    Assignment,
    GenerateRequest,
    ReleaseRequest,
    StreamMessage,
    parse_stream_line,
)

log = logging.getLogger(__name__)


FAILOVER_WAIT_S = 2 * CONTROLLER_LEASE_TTL_S + 2.0
"""Seconds a controller call keeps trying the known controllers (a standby answers NotLeader;
a dead leader's lease takes up to its TTL to expire) before it gives up with 503."""


class Upstream:
    """HTTP clients to the controllers and to invokers, sharing one connection pool.

    Args:
        controller_urls: ``http://host:port`` of each controller; calls go to the one that
            answered last and move on to the next when it is unreachable or a standby.
    """

    def __init__(self, controller_urls: Sequence[str]) -> None:
        if not controller_urls:
            raise ValueError("at least one controller URL is needed")
        self.controller_urls = [u.rstrip("/") for u in controller_urls]
        self._current = 0
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=COLD_START_DEADLINE_S + 30.0),
            # idle connections go before the servers' (uvicorn: 5 s) close them under a request
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100,
                                keepalive_expiry=2.0),
        )
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._http.aclose()

    @property
    def controller_url(self) -> str:
        """The controller calls go to now (the leader, as far as the gateway knows)."""
        return self.controller_urls[self._current]

    async def controller(self, method: str, path: str, *, json: Any = None) -> httpx.Response:
        """Call the leading controller: on a connection failure or a NotLeader answer, try the
        next known controller, for up to :data:`FAILOVER_WAIT_S` seconds.

        Raises:
            SllmError: the error the leader answered.
            Unavailable: no controller led within the wait.
        """
        deadline = time.monotonic() + FAILOVER_WAIT_S
        n = len(self.controller_urls)
        while True:
            for _ in range(n):
                url = self.controller_urls[self._current]
                try:
                    r = await self._http.request(method, f"{url}{path}", json=json)
                    raise_for_error(r)
                    return r
                except httpx.HTTPError as e:
                    failure: str = f"{url} is unreachable: {e!r}"
                except NotLeader as e:
                    failure = e.message
                self._current = (self._current + 1) % n
            if time.monotonic() >= deadline:
                raise Unavailable(f"no controller leads: {failure}", retry_after=2)
            await asyncio.sleep(0.2)

    async def acquire(self, function: str, *, resume: bool = False,
                      prefer: str | None = None) -> Assignment:
        """Ask the controller for an instance slot (waits through a cold start); ``resume``
        for a generation that was moved off its instance (the controller moves no other
        instance to make room for it, so preemptions cannot chain); ``prefer`` an instance
        to take when it has a free slot."""
        body = AcquireRequest(function=function, resume=resume, prefer=prefer).model_dump()
        r = await self.controller("POST", routes.Controller.ACQUIRE, json=body)
        return Assignment.model_validate_json(r.content)

    def release_soon(self, instance_id: str, stream: httpx.Response | None = None, *,
                     failed: str | None = None, moved_to: str | None = None,
                     after: asyncio.Task[None] | None = None) -> asyncio.Task[None]:
        """Close the invoker's token ``stream`` (which cancels its generation if still running)
        and give the slot back, in a task of its own: a request cancelled because its client
        went away can no longer await anything itself. ``failed`` tells the controller the
        invoker could not be reached (it checks and marks its instances lost); ``moved_to``
        that the slot moves to that instance (the generation migrated there). The release is
        sent once ``after`` (an earlier release of the same activation) is done, so that the
        controller sees an activation's releases in order. Returns the task."""
        async def release() -> None:
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)
            if stream is not None:
                await stream.aclose()
            try:
                body = ReleaseRequest(instance_id=instance_id, failed=failed, moved_to=moved_to)
                await self.controller("POST", routes.Controller.RELEASE, json=body.model_dump())
            except SllmError as e:
                log.warning("release of %s failed: %s", instance_id, e.message)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def open_stream(self, assignment: Assignment, request: GenerateRequest) -> httpx.Response:
        """Start a generation on the assigned instance. Returns the open streaming response
        (status 200); errors the invoker answers before streaming are raised here."""
        url = assignment.invoker_url + routes.path(routes.Invoker.GENERATE, id=assignment.instance_id)
        req = self._http.build_request("POST", url, json=request.model_dump(mode="json"))
        try:
            r = await self._http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise InvokerUnreachable(f"invoker at {assignment.invoker_url} is unreachable: {e!r}") from e
        if r.status_code != 200:
            await r.aread()
            await r.aclose()
            raise_for_error(r)
        return r

    @staticmethod
    async def messages(response: httpx.Response) -> AsyncIterator[StreamMessage]:
        """The invoker's stream messages (TokenMessage, DoneMessage, ErrorMessage,
        MigratedMessage), parsed.

        Raises:
            StreamBroken: the connection broke.
            InvokerError: a line does not parse.
        """
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    yield parse_stream_line(line)
        except httpx.HTTPError as e:
            raise StreamBroken(f"the invoker's stream broke: {e!r}") from e
        except ValueError as e:
            raise InvokerError(f"the invoker sent a malformed stream message: {e}") from e
