"""The controller service: function registry, instance placement and autoscaling.

HTTP API (JSON; errors in the OpenAI-shaped envelope of :mod:`sllm.errors`):

- ``POST /v1/functions`` (manifest) create; ``PUT /v1/functions/{name}`` create or replace;
  ``GET /v1/functions``; ``GET|DELETE /v1/functions/{name}``
- ``POST /v1/acquire`` (:class:`~sllm.messages.AcquireRequest`) -> :class:`~sllm.messages.Assignment`;
  ``POST /v1/release`` (:class:`~sllm.messages.ReleaseRequest`)
- ``GET /v1/instances``, ``GET /v1/invokers``, ``GET /v1/checkpoints`` (tier of each model on
  each invoker), ``GET /health``

A reconcile loop runs every :data:`~sllm.config.AUTOSCALER_TICK_S`: it drops instances whose
invoker's lease expired, then carries out :func:`controller.autoscaler.decide`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller.autoscaler import decide
from controller.invoker_client import InvokerClient
from controller.pool import InstancePool
from controller.registry import FunctionRegistry
from sllm import keys
from sllm.config import AUTOSCALER_TICK_S, COLD_START_DEADLINE_S
from sllm.errors import InvalidRequest, SllmError, Unavailable
from sllm.etcd import Etcd
from sllm.http import EXCEPTION_HANDLERS, model_response, read_json, read_model
from sllm.manifest import validate_manifest
from sllm.messages import (
    AcquireRequest,
    CheckpointRecord,
    FunctionRecord,
    InstanceRecord,
    InvokerRecord,
    ReleaseRequest,
)

log = logging.getLogger(__name__)


@dataclass
class ControllerConfig:
    etcd_endpoint: str
    model_exists: Callable[[str], bool]  # is a model name in the model store
    tick_s: float = AUTOSCALER_TICK_S
    deadline_s: float = COLD_START_DEADLINE_S


class Controller:
    """The controller's state and its reconcile loop."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.etcd = Etcd(config.etcd_endpoint)
        self.invoker_client = InvokerClient()
        self.registry = FunctionRegistry(self.etcd, config.model_exists)
        self.pool = InstancePool(self.etcd, self.invoker_client, self.list_invokers)
        self._invokers_cache: list[InvokerRecord] = []

    async def list_invokers(self) -> list[InvokerRecord]:
        """Live invokers (those whose lease is alive), from etcd; the last known list when etcd
        is briefly away."""
        try:
            self._invokers_cache = await self.etcd.list(keys.Kind.INVOKER, InvokerRecord)
        except Unavailable as e:
            log.warning("using the last known invokers: %s", e)
        return self._invokers_cache

    async def recover(self) -> None:
        """Adopt the instances a previous controller left in etcd (see InstancePool.adopt)."""
        records = await self.etcd.list(keys.Kind.INSTANCE, InstanceRecord)
        alive: dict[str, set[str]] = {}
        for inv in await self.list_invokers():
            try:
                alive[inv.id] = set(await self.invoker_client.list_instances(inv.url))
            except SllmError as e:
                log.warning("invoker %s unreachable during recovery: %s", inv.id, e.message)
        await self.pool.adopt(records, alive)
        await self.registry.list()

    async def reconcile(self) -> None:
        """One pass: drop instances on dead invokers, then scale by the autoscaler's decision."""
        live_ids = {i.id for i in await self.list_invokers()}
        for rec in self.pool.records():
            if rec.invoker_id not in live_ids:
                await self.pool.stop(rec.id, reason=f"invoker {rec.invoker_id} lost", unload=False)
        functions = {r.manifest.name: r.manifest for r in await self.registry.list()}
        decision = decide(time.time(), functions, self.pool.views())
        for iid in decision.stop:
            await self.pool.stop(iid, reason="scaled down (keep-alive expired or function changed)")
        for name, count in decision.start.items():
            for _ in range(count):
                try:
                    await self.pool.start_instance(functions[name])
                except SllmError as e:
                    log.warning("could not start a minimum instance of %s: %s", name, e.message)

    async def run_reconciler(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Unavailable as e:
                log.warning("reconcile skipped: %s", e.message)
            except Exception:
                log.exception("reconcile failed")
            await asyncio.sleep(self.config.tick_s)

    async def close(self) -> None:
        await self.pool.close()
        await self.invoker_client.close()
        await self.etcd.close()


def function_view(record: FunctionRecord, instances: list[InstanceRecord]) -> dict[str, Any]:
    """The API's view of a function: its manifest, timestamps and instances."""
    return {
        "name": record.manifest.name,
        "manifest": record.manifest.model_dump(mode="json"),
        "created": record.created,
        "updated": record.updated,
        "generation": record.generation,
        "instances": [i.model_dump(mode="json") for i in instances if i.function == record.manifest.name],
    }


def create_app(config: ControllerConfig) -> Starlette:
    """The controller's ASGI app; its lifespan connects etcd, recovers state and starts the
    reconcile loop and the instance-record flusher."""
    ctl = Controller(config)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "component": "controller"})

    async def list_functions(request: Request) -> Response:
        records = await ctl.registry.list()
        insts = ctl.pool.records()
        return JSONResponse({"functions": [function_view(r, insts) for r in records]})

    async def create_function(request: Request) -> Response:
        manifest = validate_manifest(await read_json(request))
        record = await ctl.registry.create(manifest)
        return JSONResponse(function_view(record, []), status_code=201)

    async def put_function(request: Request) -> Response:
        name = request.path_params["name"]
        manifest = validate_manifest(await read_json(request))
        if manifest.name != name:
            raise InvalidRequest(
                f"metadata.name {manifest.name!r} does not match the URL's {name!r}",
                param="metadata.name",
            )
        record, created = await ctl.registry.apply(manifest)
        return JSONResponse(function_view(record, ctl.pool.records()),
                            status_code=201 if created else 200)

    async def get_function(request: Request) -> Response:
        record = await ctl.registry.get(request.path_params["name"])
        return JSONResponse(function_view(record, ctl.pool.records()))

    async def delete_function(request: Request) -> Response:
        name = request.path_params["name"]
        record = await ctl.registry.delete(name)
        for rec in ctl.pool.records():
            live = ctl.pool.instances.get(rec.id)
            if rec.function == name and live is not None and live.in_flight == 0:
                await ctl.pool.stop(rec.id, reason="function deleted")
        return JSONResponse({"deleted": name, "manifest": record.manifest.model_dump(mode="json")})

    async def acquire(request: Request) -> Response:
        req = await read_model(request, AcquireRequest)
        record = await ctl.registry.get(req.function, cached=True)
        assignment = await ctl.pool.acquire(record.manifest, config.deadline_s)
        return model_response(assignment)

    async def release(request: Request) -> Response:
        req = await read_model(request, ReleaseRequest)
        await ctl.pool.release(req.instance_id)
        return JSONResponse({"released": req.instance_id})

    async def list_instances(request: Request) -> Response:
        return JSONResponse({"instances": [r.model_dump(mode="json") for r in ctl.pool.records()]})

    async def list_checkpoints(request: Request) -> Response:
        records = await ctl.etcd.list(keys.Kind.CHECKPOINT, CheckpointRecord)
        return JSONResponse({"checkpoints": [r.model_dump(mode="json") for r in records]})

    async def list_invokers(request: Request) -> Response:
        used = ctl.pool.used_bytes()
        out = []
        for inv in await ctl.list_invokers():
            d = inv.model_dump(mode="json")
            d["used_bytes"] = used.get(inv.id, 0)
            out.append(d)
        return JSONResponse({"invokers": out})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ctl.recover()
        tasks = [asyncio.create_task(ctl.run_reconciler()), asyncio.create_task(ctl.pool.run_flusher())]
        app.state.controller = ctl
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await ctl.pool.flush()
            await ctl.close()

    routes = [
        Route("/health", health),
        Route("/v1/functions", list_functions, methods=["GET"]),
        Route("/v1/functions", create_function, methods=["POST"]),
        Route("/v1/functions/{name}", get_function, methods=["GET"]),
        Route("/v1/functions/{name}", put_function, methods=["PUT"]),
        Route("/v1/functions/{name}", delete_function, methods=["DELETE"]),
        Route("/v1/acquire", acquire, methods=["POST"]),
        Route("/v1/release", release, methods=["POST"]),
        Route("/v1/instances", list_instances),
        Route("/v1/invokers", list_invokers),
        Route("/v1/checkpoints", list_checkpoints),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
