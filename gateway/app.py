"""The gateway: sllm's HTTP front door (default http://127.0.0.1:8080).

Routes:

- invocation: ``POST /v1/functions/{name}/invoke`` (:mod:`gateway.native`);
  ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
  (:mod:`gateway.openai`);
- management, forwarded to the controller: ``POST /v1/functions``, ``PUT /v1/functions/{name}``
  (a manifest as JSON, or as YAML with ``Content-Type: application/yaml``),
  ``GET /v1/functions``, ``GET|DELETE /v1/functions/{name}``, ``GET /v1/instances``,
  ``GET /v1/invokers``, ``GET /v1/checkpoints``, ``POST /v1/instances/{id}/migrate``;
- activation records (:mod:`gateway.records`): ``GET /v1/activations``,
  ``GET /v1/activations/{id}``;
- ``GET /health``, ``GET /metrics`` (Prometheus).

Auth: when an API key is configured, every ``/v1`` route needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import native, openai
from gateway.metrics import METRICS
from gateway.records import ACTIVATIONS
from gateway.upstream import Upstream
from sllm import routes
from sllm.errors import InvalidRequest, Unauthorized
from sllm.http import EXCEPTION_HANDLERS, MAX_BODY_BYTES, MIDDLEWARE, read_json
from sllm.manifest import FunctionManifest, manifest_to_dict, parse_manifest, validate_manifest


@dataclass(frozen=True)
class GatewayConfig:
    controller_urls: tuple[str, ...]  # the leader and its standbys, in the order to try them
    api_key: str | None = None


async def _manifest_body(request: Request) -> FunctionManifest:
    """The manifest in a request body: YAML when the content type says so, else JSON."""
    ctype = request.headers.get("content-type", "")
    if "yaml" in ctype:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise InvalidRequest(f"manifest is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            return parse_manifest(body.decode())
        except UnicodeDecodeError:
            raise InvalidRequest("manifest is not valid UTF-8") from None
    return validate_manifest(await read_json(request))


def create_app(config: GatewayConfig) -> Starlette:
    """The gateway's ASGI app."""
    upstream = Upstream(config.controller_urls)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            if config.api_key is not None:
                auth = request.headers.get("authorization", "")
                given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
                if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                    raise Unauthorized("missing or invalid API key (Authorization: Bearer <key>)")
            return await handler(request)
        return wrapper

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "component": "gateway"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)

    async def invoke(request: Request) -> Response:
        return await native.invoke(request, upstream)

    async def chat(request: Request) -> Response:
        return await openai.chat_completions(request, upstream)

    async def completions(request: Request) -> Response:
        return await openai.completions(request, upstream)

    async def models(request: Request) -> Response:
        return await openai.models(request, upstream)

    async def activations(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            raise InvalidRequest("limit must be an integer", param="limit") from None
        return JSONResponse({"activations": ACTIVATIONS.recent(limit)})

    async def activation_record(request: Request) -> Response:
        return JSONResponse(ACTIVATIONS.get(request.path_params["id"]))

    async def relay(request: Request, json_body: Any) -> Response:
        r = await upstream.controller(request.method, request.url.path, json=json_body)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def forward(request: Request) -> Response:
        """Function management goes to the controller as it is, after the manifest is
        validated here."""
        json_body = None
        if request.method in ("POST", "PUT"):
            json_body = manifest_to_dict(await _manifest_body(request))
        return await relay(request, json_body)

    async def forward_json(request: Request) -> Response:
        """Operator calls with a JSON body (migrate), which the controller validates."""
        return await relay(request, await read_json(request))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await upstream.close()

    g, R = guarded, routes.Gateway
    table = [
        Route(routes.HEALTH, health),
        Route(routes.METRICS, metrics),
        Route(R.INVOKE, g(invoke), methods=["POST"]),
        Route(R.CHAT_COMPLETIONS, g(chat), methods=["POST"]),
        Route(R.COMPLETIONS, g(completions), methods=["POST"]),
        Route(R.MODELS, g(models), methods=["GET"]),
        Route(R.FUNCTIONS, g(forward), methods=["GET", "POST"]),
        Route(R.FUNCTION, g(forward), methods=["GET", "PUT", "DELETE"]),
        Route(R.INSTANCES, g(forward), methods=["GET"]),
        Route(R.MIGRATE, g(forward_json), methods=["POST"]),
        Route(R.ACTIVATIONS, g(activations), methods=["GET"]),
        Route(R.ACTIVATION, g(activation_record), methods=["GET"]),
        Route(R.INVOKERS, g(forward), methods=["GET"]),
        Route(R.CHECKPOINTS, g(forward), methods=["GET"]),
    ]
    return Starlette(routes=table, exception_handlers=EXCEPTION_HANDLERS, middleware=MIDDLEWARE,
                     lifespan=lifespan)
