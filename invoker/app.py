"""The invoker service: one per node. It loads instances from the local model store and runs
their generations. This module is its routes and lifespan; the work is in
:mod:`invoker.node` (registration, publishing, the DRAM tier), :mod:`invoker.fetching`,
:mod:`invoker.instances` (loads, unloads, live migration) and :mod:`invoker.engine`
(generation).

HTTP API (:class:`sllm.routes.Invoker`; JSON; errors in the OpenAI-shaped envelope of
:mod:`sllm.errors`):

- ``POST /v1/instances`` (:class:`~sllm.messages.LoadRequest`) -> :class:`~sllm.messages.LoadResponse`
  once the instance is loaded; ``GET /v1/instances``; ``DELETE /v1/instances/{id}``. A load
  first fetches the checkpoint into the local store when there is no copy (or a stale one) from
  the peers the request names, then the store root (:mod:`store.transfer`).
- ``GET /v1/checkpoints/{model}`` and ``GET /v1/checkpoints/{model}/files/{path}`` (with Range):
  the local checkpoints, for other invokers to fetch (:mod:`store.files_api`);
  ``PUT /v1/checkpoints/{model}`` (:class:`~sllm.messages.ReplicateRequest`) ->
  :class:`~sllm.messages.ReplicateResponse`: fetch a copy ahead of any load;
  ``DELETE /v1/checkpoints/{model}/replication`` -> :class:`~sllm.messages.ReplicationPaused`.
- ``POST /v1/instances/{id}/generate`` (:class:`~sllm.messages.GenerateRequest`): a stream of
  newline-delimited JSON, one :class:`~sllm.messages.TokenMessage` per token, then a
  :class:`~sllm.messages.DoneMessage` (or an :class:`~sllm.messages.ErrorMessage` when generation
  fails after the stream began, or a :class:`~sllm.messages.MigratedMessage` when it moved
  away). Bad input (empty or oversized prompt) is refused with a status before the stream
  starts. A client that disconnects cancels its generation. With ``resume`` it continues a
  generation that began elsewhere.
- live migration (:mod:`invoker.migration`): ``POST /v1/instances/{id}/migrate``
  (:class:`~sllm.messages.MigrateRequest`, as the source) -> :class:`~sllm.messages.MigrateResponse`;
  ``POST /v1/instances/{id}/migrations`` (:class:`~sllm.messages.PrefillRequest`, as the
  destination) and ``DELETE /v1/instances/{id}/migrations/{session}``. Unloading an instance
  under running generations hands them back to the gateway to resume elsewhere (preemption).
- ``GET /metrics``: each instance's engine (:mod:`invoker.metrics`).
- ``GET /health``: status (``degraded`` when started for the native I/O engine without it), id,
  the threads it computes with (``compute_threads``), its I/O engine and its problems.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from invoker import metrics as invoker_metrics
from invoker.config import InvokerConfig
from invoker.engine import Engine
from invoker.engine.batching import BatchEngine
from invoker.fetching import Fetcher
from invoker.instances import Instances
from invoker.node import Node
from sllm import routes
from sllm.http import EXCEPTION_HANDLERS, MIDDLEWARE, model_response, read_model
from sllm.messages import (
    STREAM_MEDIA_TYPE,
    GenerateRequest,
    LoadRequest,
    MigrateRequest,
    PrefillRequest,
    ReplicateRequest,
    stream_line,
)
from store.files_api import checkpoint_file_routes
from store.model_store import ModelStore


def create_app(config: InvokerConfig) -> Starlette:
    """The invoker's ASGI app; its lifespan gets the node ready and registers it in etcd.

    Raises:
        ValueError: an unknown ``config.io_engine``.
    """
    store = ModelStore(config.store_root)
    node = Node(config, store)
    fetcher = Fetcher(config, store, node)
    instances = Instances(config, store, node, fetcher)
    batching = BatchEngine(instances.sessions)
    engine: Engine = batching
    metrics = invoker_metrics.registry(lambda: {
        iid: (instances.loaded[iid].function, eng) for iid, eng in list(batching.engines.items())
        if iid in instances.loaded})

    async def health(request: Request) -> Response:
        import torch

        return JSONResponse({
            "status": "degraded" if node.degraded else "ok", "component": "invoker",
            "id": config.invoker_id, "compute_threads": torch.get_num_threads(),
            "io_engine": node.io_engine,
            "problems": [node.io_engine_problem] if node.io_engine_problem else [],
        })

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    async def load(request: Request) -> Response:
        req = await read_model(request, LoadRequest)
        return model_response(await instances.load(req))

    async def list_instances(request: Request) -> Response:
        return JSONResponse({"instances": [
            {"instance_id": i.instance_id, "function": i.function, "model": i.model,
             "device": str(i.instance.device), "tier": i.checkpoint.tier,
             "load_seconds": i.load_seconds, "loaded_at": i.loaded_at}
            for i in instances.loaded.values()
        ]})

    async def unload(request: Request) -> Response:
        await instances.unload(request.path_params["id"])
        return JSONResponse({"unloaded": request.path_params["id"]})

    async def generate(request: Request) -> Response:
        inst = instances.get(request.path_params["id"])
        stream = await engine.submit(inst, await read_model(request, GenerateRequest))

        async def lines() -> AsyncIterator[str]:
            async with contextlib.aclosing(stream):  # closing it cancels the generation
                async for msg in stream:
                    yield stream_line(msg)

        return StreamingResponse(lines(), media_type=STREAM_MEDIA_TYPE)

    async def migrate(request: Request) -> Response:
        req = await read_model(request, MigrateRequest)
        return model_response(await instances.migrate(request.path_params["id"], req))

    async def prefill(request: Request) -> Response:
        req = await read_model(request, PrefillRequest)
        return model_response(await instances.prefill(request.path_params["id"], req))

    async def replicate(request: Request) -> Response:
        req = await read_model(request, ReplicateRequest)
        return model_response(await fetcher.replicate(request.path_params["model"], req))

    async def pause_replication(request: Request) -> Response:
        return model_response(fetcher.pause_replication(request.path_params["model"]))

    async def drop_session(request: Request) -> Response:
        dropped = instances.sessions.drop(request.path_params["session"])
        return JSONResponse({"dropped": dropped})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            await node.close()
            await instances.close()

    R = routes.Invoker
    table = [
        Route(routes.HEALTH, health),
        Route(routes.METRICS, metrics_text),
        Route(R.INSTANCES, load, methods=["POST"]),
        Route(R.INSTANCES, list_instances, methods=["GET"]),
        Route(R.INSTANCE, unload, methods=["DELETE"]),
        Route(R.GENERATE, generate, methods=["POST"]),
        Route(R.MIGRATE, migrate, methods=["POST"]),
        Route(R.PREFILL, prefill, methods=["POST"]),
        Route(R.SESSION, drop_session, methods=["DELETE"]),
        Route(R.CHECKPOINT, replicate, methods=["PUT"]),
        Route(R.REPLICATION, pause_replication, methods=["DELETE"]),
        *checkpoint_file_routes(store),
    ]
    return Starlette(routes=table, exception_handlers=EXCEPTION_HANDLERS, middleware=MIDDLEWARE,
                     lifespan=lifespan)
