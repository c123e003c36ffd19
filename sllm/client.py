"""A client of the gateway's HTTP API, for the CLI, the benchmarks and the tests: the routes of
:mod:`sllm.routes`, errors raised as the :mod:`sllm.errors` the gateway answered, Server-Sent
Events decoded by :mod:`sllm.sse`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import httpx

from sllm import routes
from sllm.errors import Unavailable
from sllm.http import raise_for_error
from sllm.sse import parse_events


class GatewayClient:
    """Blocking calls to one gateway.

    Args:
        url: the gateway's base URL (``http://127.0.0.1:8080``).
        api_key: sent as ``Authorization: Bearer``; default ``$SLLM_API_KEY`` when set.
        read_timeout_s: seconds to wait for a response's next bytes (a cold start sends none
            until its first token).
    """

    def __init__(self, url: str, *, api_key: str | None = None, read_timeout_s: float = 600.0
                 ) -> None:
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("SLLM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(10.0, read=read_timeout_s))

    def call(self, method: str, template: str, *, json: Any = None, **params: str) -> Any:
        """One request to the route ``template`` (filled with ``params``); its decoded JSON.

        Raises:
            Unavailable: no gateway answers at ``url``.
            SllmError: the error the gateway answered (FunctionNotFound, InvalidRequest, ...).
        """
        with self._reaching():
            r = self.http.request(method, routes.path(template, **params), json=json)
        raise_for_error(r)
        return r.json()

    def events(self, template: str, body: Any, **params: str) -> Iterator[tuple[str, Any]]:
        """POST ``body`` and yield the ``(event name, decoded data)`` of the Server-Sent Events
        answer, as they arrive.

        Raises:
            Unavailable: no gateway answers.
            SllmError: the gateway refused the request (before its first event).
        """
        with self._reaching(), self.http.stream("POST", routes.path(template, **params),
                                                json=body) as r:
            if r.status_code != 200:
                r.read()
                raise_for_error(r)
            yield from parse_events(r.iter_lines())

    def invoke(self, function: str, **body: Any) -> dict[str, Any]:
        """A non-streaming invocation (native API); the final body (text, usage, timings)."""
        return self.call("POST", routes.Gateway.INVOKE, json={**body, "stream": False},  # type: ignore[no-any-return]
                         name=function)

    def invoke_stream(self, function: str, **body: Any) -> Iterator[tuple[str, Any]]:
        """A streaming invocation: its ``token`` events, then ``done`` (or ``error``)."""
        return self.events(routes.Gateway.INVOKE, {**body, "stream": True}, name=function)

    def deploy(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a function from its manifest (a dict); the function's view."""
        name = manifest["metadata"]["name"]
        return self.call("PUT", routes.Gateway.FUNCTION, json=manifest, name=name)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turns a failure to reach the gateway into Unavailable naming it."""
        try:
            yield
        except httpx.ConnectError:
            raise Unavailable(f"no gateway at {self.url}; start the runtime with: sllm up --detach"
                              ) from None
        except httpx.HTTPError as e:
            raise Unavailable(f"gateway at {self.url}: {e}") from None
