"""HTTP plumbing shared by the services: the one place errors become responses, request-body
parsing into pydantic models, and turning a peer's error response back into an exception.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sllm.errors import InternalError, InvalidRequest, NotFound, SllmError, from_body
from sllm.validation import invalid_request

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 4 << 20
"""Request bodies larger than this are refused (400) before they are parsed."""


def error_response(err: SllmError) -> JSONResponse:
    """The response for ``err``: its status, OpenAI-shaped body, and Retry-After when set."""
    return JSONResponse(err.to_body(), status_code=err.status, headers=err.headers())


async def handle_sllm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SllmError)
    if exc.status >= 500:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    cls = NotFound if exc.status_code == 404 else InvalidRequest
    err = cls(str(exc.detail))
    return JSONResponse(err.to_body(), status_code=exc.status_code)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    SllmError: handle_sllm_error,
    HTTPException: handle_http_error,
}
"""Pass as ``Starlette(exception_handlers=...)``: every service maps errors the same way.
Anything else is a bug, answered by :class:`UnexpectedErrors` (pass :data:`MIDDLEWARE` too)."""


class UnexpectedErrors:
    """ASGI middleware: an exception no handler maps (a bug) is logged and answered 500 with
    the OpenAI error envelope (:class:`~sllm.errors.InternalError`), and the connection stays
    usable for the client's next request.

    Why not ``exception_handlers={Exception: ...}``: Starlette runs that handler in its
    outermost middleware, which sends the response and then re-raises, and uvicorn answers an
    exception from a response already started by closing the connection: the client's next
    request on that kept-alive connection failed with "Connection reset by peer". When the
    response had already started (a stream broken off by a bug), no status can be sent any
    more: the exception goes on to the server, which closes the connection, the only way left to
    tell the client that the body is incomplete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            response = error_response(InternalError(f"internal error: {type(exc).__name__}: {exc}"))
            await response(scope, receive, send)


MIDDLEWARE = [Middleware(UnexpectedErrors)]
"""Pass as ``Starlette(middleware=...)`` with :data:`EXCEPTION_HANDLERS`."""


async def read_json(request: Request) -> Any:
    """The request's JSON body. Raises InvalidRequest for an oversized or malformed body."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None


async def read_model(request: Request, model: type[M]) -> M:
    """The request's JSON body validated as ``model``.

    Raises:
        InvalidRequest: malformed JSON, or a field that fails validation (named in the message
            and in ``param``).
    """
    data = await read_json(request)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_request(e) from None


def model_response(model: BaseModel, status_code: int = 200) -> JSONResponse:
    """A JSON response with the model's fields."""
    return JSONResponse(model.model_dump(mode="json"), status_code=status_code)


def raise_for_error(response: httpx.Response) -> None:
    """Raise the :class:`SllmError` a peer's non-2xx response carries (already-read responses)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = response.text
    err = from_body(response.status_code, body)
    retry = response.headers.get("Retry-After")
    if retry is not None:
        with contextlib.suppress(ValueError):
            err.retry_after = float(retry)
    raise err
