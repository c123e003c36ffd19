"""The services' error plumbing (sllm.http) over real HTTP: a bug answers 500 in the OpenAI error
envelope and the connection stays open for the client's next request; a stream broken off by a
bug closes the connection, the only way left to tell the client its body is incomplete."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cli.launcher import free_port
from sllm.errors import FunctionNotFound
from sllm.http import EXCEPTION_HANDLERS, MIDDLEWARE


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def bug(request: Request) -> Response:
    raise KeyError("a bug")


async def not_found(request: Request) -> Response:
    raise FunctionNotFound("no function named 'x'", param="model")


async def broken_stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"first part\n"
        raise RuntimeError("a bug after the first part")

    return StreamingResponse(body(), media_type="text/plain")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A Starlette app with the services' handlers and middleware, under uvicorn on loopback."""
    app = Starlette(routes=[Route("/ok", ok), Route("/bug", bug), Route("/missing", not_found),
                            Route("/stream", broken_stream)],
                    exception_handlers=EXCEPTION_HANDLERS, middleware=MIDDLEWARE)
    p = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=p, log_level="critical",
                                           lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield p
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_bug_is_a_500_envelope_and_the_connection_carries_the_next_request(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/bug")
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 500 and not r.will_close
        assert body["error"]["code"] == "internal_error"
        assert body["error"]["type"] == "server_error"
        assert "KeyError" in body["error"]["message"]
        assert conn.sock is not None
        local = conn.sock.getsockname()[1]
        for path, status in (("/ok", 200), ("/missing", 404), ("/bug", 500), ("/ok", 200)):
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            assert r.status == status
            assert conn.sock is not None and conn.sock.getsockname()[1] == local
    finally:
        conn.close()


def test_a_stream_broken_by_a_bug_is_cut_short_not_completed(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/stream")
        r = conn.getresponse()
        assert r.status == 200
        with pytest.raises(http.client.IncompleteRead) as e:
            r.read()
        assert e.value.partial == b"first part\n"
    finally:
        conn.close()
