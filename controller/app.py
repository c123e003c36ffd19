"""The controller service: function registry, instance placement and autoscaling.

HTTP API (JSON; errors in the OpenAI-shaped envelope of :mod:`sllm.errors`):

- ``POST /v1/functions`` (manifest) create; ``PUT /v1/functions/{name}`` create or replace;
  ``GET /v1/functions``; ``GET|DELETE /v1/functions/{name}`` (a function's view holds its
  instances, each with the placement decision that put it where it is and every candidate's
  estimate)
- ``POST /v1/acquire`` (:class:`~sllm.messages.AcquireRequest`) -> :class:`~sllm.messages.Assignment`;
  ``POST /v1/release`` (:class:`~sllm.messages.ReleaseRequest`)
- ``GET /v1/instances``, ``GET /v1/invokers`` (with measured bandwidths and used memory),
  ``GET /v1/checkpoints`` (tier of each model on each invoker), ``GET /health`` (with the role)

Several controllers may run: one leads, elected through an etcd lease
(:mod:`controller.leader`); the others answer every API call but ``/health`` with
:class:`~sllm.errors.NotLeader` (503), naming the leader, and take over when its lease expires.
A new leader rebuilds its state from etcd (:meth:`Controller.recover`): functions, instances
(adopted, re-sent when their load was pending, or marked lost), and orphans are unloaded.

The leader's reconcile loop runs every ``tick_s``: it marks lost the instances of invokers whose
lease expired, refreshes where checkpoints are, carries out
:func:`controller.autoscaler.decide`, starts the checkpoint copies burst-ready replication asks
for (:mod:`controller.replication`, unless turned off), and now and then unloads orphans
(instances an invoker has that no record names).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller.autoscaler import decide
from controller.instances import InstancePool, MigrationMode
from controller.invoker_client import InvokerClient
from controller.leader import LeaderElection
from controller.placement import Policy
from controller.registry import FunctionRegistry
from controller.replication import Replicator
from sllm import keys, routes
from sllm.config import AUTOSCALER_TICK_S, CONTROLLER_LEASE_TTL_S
from sllm.errors import InvalidRequest, NotLeader, SllmError, Unavailable
from sllm.etcd import Etcd
from sllm.http import EXCEPTION_HANDLERS, MIDDLEWARE, model_response, read_json, read_model
from sllm.manifest import FunctionManifest, validate_manifest
from sllm.messages import (
    AcquireRequest,
    CheckpointRecord,
    FunctionRecord,
    InstanceRecord,
    InvokerRecord,
    MigrateInstanceRequest,
    ReleaseRequest,
)

log = logging.getLogger(__name__)

ORPHAN_SWEEP_S = 30.0
"""Seconds between two sweeps for orphans (instances an invoker has that no record names)."""


@dataclass
class ControllerConfig:
    etcd_endpoint: str
    model_exists: Callable[[str], bool]  # is a model name in the store root
    model_bytes: Callable[[str], int]  # checkpoint size of a model in the store root (bytes)
    controller_id: str = "controller-0"
    url: str = ""  # where this controller's API answers (named by standbys)
    tick_s: float = AUTOSCALER_TICK_S
    policy: Policy = "ours"
    migration: MigrationMode = "live"
    lease_ttl_s: int = CONTROLLER_LEASE_TTL_S
    replication: bool = True  # copy checkpoints ahead of bursts (controller.replication)


class Controller:
    """The controller's state, its leadership and its reconcile loop."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.etcd = Etcd(config.etcd_endpoint)
        self.invoker_client = InvokerClient()
        self.registry = FunctionRegistry(self.etcd, config.model_exists)
        self.pool = self._new_pool()
        self.election = LeaderElection(self.etcd, "controller", config.controller_id, config.url,
                                       ttl_s=config.lease_ttl_s)
        self._invokers_cache: list[InvokerRecord] = []
        self._invokers_listing: asyncio.Future[None] | None = None  # the etcd list in flight
        self._leading: list[asyncio.Task[None]] = []
        self.replicator: Replicator | None = None  # while leading, with replication on
        self._last_sweep = 0.0

    def _new_pool(self) -> InstancePool:
        return InstancePool(self.etcd, self.invoker_client, self.list_invokers,
                            self.config.model_bytes, policy=self.config.policy,
                            migration=self.config.migration, manifest_of=self._manifest_of)

    async def _manifest_of(self, function: str) -> FunctionManifest:
        return (await self.registry.get(function, cached=True)).manifest

    @property
    def leading(self) -> bool:
        return bool(self._leading)

    async def require_leader(self) -> None:
        """Raise NotLeader (503, naming the leader) unless this controller leads."""
        if self.leading:
            return
        try:
            leader = await self.election.leader()
        except Unavailable:
            leader = None
        where = f"; the leader is {leader.holder} at {leader.url}" if leader else ""
        raise NotLeader(f"controller {self.config.controller_id} is a standby{where}", retry_after=1)

    async def on_elected(self) -> None:
        """Become the leader: rebuild state from etcd, then run the reconcile loop and the
        instance-record flusher."""
        self.pool = self._new_pool()
        while True:  # cancelled by the election if the lead is lost meanwhile
            try:
                await self.recover()
                break
            except Unavailable as e:
                log.warning("recovery waits for etcd: %s", e.message)
            except Exception:
                log.exception("recovery failed; trying again")
            await asyncio.sleep(1.0)
        if self.config.replication:
            self.replicator = Replicator(self.invoker_client, self.pool)
        self._leading = [asyncio.create_task(self.run_reconciler()),
                         asyncio.create_task(self.pool.table.run_flusher())]
        log.info("controller %s leads", self.config.controller_id)

    async def on_deposed(self) -> None:
        """Stop leading: stop the loops and forget the in-memory state (the new leader rebuilds
        it from etcd; nothing is unloaded)."""
        tasks, self._leading = self._leading, []
        for t in tasks:
            t.cancel()
        if self.replicator is not None:
            await self.replicator.close()
            self.replicator = None
        await self.pool.close()
        self.pool = self._new_pool()
        log.warning("controller %s no longer leads", self.config.controller_id)

    async def list_invokers(self) -> list[InvokerRecord]:
        """Live invokers (those whose lease is alive), from etcd; the last known list when etcd
        is briefly away. Callers that arrive while a list is in flight share its answer (in a
        burst the waiting invocations of several functions place again on each release; see
        docs/architecture.md, Decisions). A caller's cancellation leaves the shared list
        running for the others."""
        if self._invokers_listing is None:
            self._invokers_listing = asyncio.ensure_future(self._fetch_invokers())
        await asyncio.shield(self._invokers_listing)
        return self._invokers_cache

    async def _fetch_invokers(self) -> None:
        try:
            self._invokers_cache = await self.etcd.list(keys.Kind.INVOKER, InvokerRecord)
        except Unavailable as e:
            log.warning("using the last known invokers: %s", e)
        finally:
            self._invokers_listing = None

    async def recover(self) -> None:
        """Rebuild the pool from etcd (see InstancePool.adopt) and unload orphans.

        Raises:
            Unavailable: etcd is away (the election retries).
        """
        functions = await self.registry.list()
        records = await self.etcd.list(keys.Kind.INSTANCE, InstanceRecord)
        invokers = await self.etcd.list(keys.Kind.INVOKER, InvokerRecord)
        self._invokers_cache = invokers
        reported: dict[str, set[str]] = {}
        for inv in invokers:
            try:
                reported[inv.id] = set(await self.invoker_client.list_instances(inv.url))
            except SllmError as e:
                log.warning("invoker %s unreachable during recovery: %s", inv.id, e.message)
        max_tokens = {f.manifest.name: f.manifest.spec.generation.maxTokens for f in functions}
        scheduling = {f.manifest.name: f.manifest.spec.scheduling for f in functions}
        orphans = self.pool.adopt(records, reported, max_tokens, scheduling)
        await self._unload_orphans(orphans, invokers)
        await self.pool.table.refresh_tiers()
        self._last_sweep = time.monotonic()

    async def _unload_orphans(self, orphans: list[tuple[str, str, str]],
                              invokers: list[InvokerRecord]) -> None:
        urls = {i.id: i.url for i in invokers}
        for inv_id, iid, why in orphans:
            log.warning("unloading orphan instance %s on %s: %s", iid, inv_id, why)
            try:
                await self.invoker_client.unload(urls[inv_id], iid)
            except SllmError as e:
                log.warning("unloading orphan %s failed: %s", iid, e.message)

    async def sweep_orphans(self, invokers: list[InvokerRecord]) -> None:
        """Unload instances an invoker has loaded that are not live in the pool: unknown ones,
        and lost ones on an invoker that turned out to be alive after all."""
        orphans: list[tuple[str, str, str]] = []
        for inv in invokers:
            try:
                ids = await self.invoker_client.list_instances(inv.url)
            except SllmError:
                continue  # a dead invoker is the lease's business
            orphans += [(inv.id, iid, "not a live instance of the controller") for iid in ids
                        if iid not in self.pool.table.instances]
        await self._unload_orphans(orphans, invokers)

    async def reconcile(self) -> None:
        """One pass: mark instances of dead invokers lost, refresh checkpoint tiers, scale by
        the autoscaler's decision, start the checkpoint copies replication asks for, expire
        old lost records, sweep for orphans now and then.

        Raises:
            Unavailable: etcd is away (the pass is skipped; warm invocations go on).
        """
        invokers = await self.list_invokers()
        live_ids = {i.id for i in invokers}
        table = self.pool.table
        for inv_id in sorted({i.record.invoker_id for i in table.instances.values()} - live_ids):
            table.lose_invoker(inv_id, f"invoker {inv_id} lost (its lease expired)")
        await table.refresh_tiers()
        functions = {r.manifest.name: r.manifest for r in await self.registry.list()}
        decision = decide(time.time(), functions, table.views())
        for iid in decision.stop:
            await self.pool.lifecycle.stop(iid, reason="scaled down (keep-alive expired or function changed)",
                                 if_idle=True)
        for iid in decision.drain:
            await self.pool.lifecycle.drain(iid, reason="function deleted or changed")
        for name, count in decision.start.items():
            for _ in range(count):
                try:
                    if await self.pool.capacity.start_instance(functions[name]) is None:
                        break
                except SllmError as e:
                    log.warning("could not start a minimum instance of %s: %s", name, e.message)
                    break
        if self.replicator is not None:
            self.replicator.tick(invokers, functions)
        table.expire_lost()
        if time.monotonic() - self._last_sweep >= ORPHAN_SWEEP_S:
            self._last_sweep = time.monotonic()
            await self.sweep_orphans(invokers)

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
        await self.on_deposed()
        await self.invoker_client.close()
        await self.etcd.close()


def function_view(record: FunctionRecord, instances: list[InstanceRecord]) -> dict[str, Any]:
    """The API's view of a function: its manifest, timestamps and instances (each with its
    placement decision)."""
    return {
        "name": record.manifest.name,
        "manifest": record.manifest.model_dump(mode="json"),
        "created": record.created,
        "updated": record.updated,
        "generation": record.generation,
        "instances": [i.model_dump(mode="json") for i in instances if i.function == record.manifest.name],
    }


Handler = Callable[[Request], Awaitable[Response]]


def create_app(config: ControllerConfig) -> Starlette:
    """The controller's ASGI app; its lifespan connects etcd and campaigns for leadership."""
    ctl = Controller(config)

    def leader_only(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            await ctl.require_leader()
            return await handler(request)
        return wrapped

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "component": "controller", "id": config.controller_id,
                             "role": "leader" if ctl.leading else "standby"})

    async def list_functions(request: Request) -> Response:
        records = await ctl.registry.list()
        insts = ctl.pool.table.records()
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
        return JSONResponse(function_view(record, ctl.pool.table.records()),
                            status_code=201 if created else 200)

    async def get_function(request: Request) -> Response:
        record = await ctl.registry.get(request.path_params["name"])
        return JSONResponse(function_view(record, ctl.pool.table.records()))

    async def delete_function(request: Request) -> Response:
        name = request.path_params["name"]
        record = await ctl.registry.delete(name)
        for rec in ctl.pool.table.records():
            if rec.function == name:
                await ctl.pool.lifecycle.drain(rec.id, reason="function deleted")
        return JSONResponse({"deleted": name, "manifest": record.manifest.model_dump(mode="json")})

    async def acquire(request: Request) -> Response:
        req = await read_model(request, AcquireRequest)
        record = await ctl.registry.get(req.function, cached=True)
        assignment = await ctl.pool.admission.acquire(record.manifest, may_migrate=not req.resume,
                                                          prefer=req.prefer)
        return model_response(assignment)

    async def release(request: Request) -> Response:
        req = await read_model(request, ReleaseRequest)
        await ctl.pool.admission.release(req.instance_id, failed=req.failed, moved_to=req.moved_to)
        return JSONResponse({"released": req.instance_id})

    async def list_instances(request: Request) -> Response:
        return JSONResponse({"instances": [r.model_dump(mode="json") for r in ctl.pool.table.records()]})

    async def migrate_instance(request: Request) -> Response:
        req = await read_model(request, MigrateInstanceRequest)  # {} lets placement choose
        iid = request.path_params["id"]
        resp, dest = await ctl.pool.capacity.migrate(iid, to=req.to, reason="requested by an operator",
                                                     generations=req.generations)
        return JSONResponse({"instance_id": iid, "to_instance": dest.id,
                             "to_invoker": dest.invoker_id, **resp.model_dump(mode="json")})

    async def list_checkpoints(request: Request) -> Response:
        records = await ctl.etcd.list(keys.Kind.CHECKPOINT, CheckpointRecord)
        return JSONResponse({"checkpoints": [r.model_dump(mode="json") for r in records]})

    async def list_invokers(request: Request) -> Response:
        used = ctl.pool.table.used_bytes()
        out = []
        for inv in await ctl.list_invokers():
            d = inv.model_dump(mode="json")
            d["used_bytes"] = used.get(inv.id, 0)
            out.append(d)
        return JSONResponse({"invokers": out})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        campaign = asyncio.create_task(ctl.election.run(ctl.on_elected, ctl.on_deposed))
        app.state.controller = ctl
        try:
            yield
        finally:
            if ctl.leading:
                with contextlib.suppress(Exception):
                    await ctl.pool.table.flush()
            campaign.cancel()
            await asyncio.wait({campaign})  # unlike awaiting it, never raises its error
            if not campaign.cancelled() and campaign.exception() is not None:
                log.error("leader election ended with an error", exc_info=campaign.exception())
            await ctl.close()

    R = routes.Controller
    table = [
        Route(routes.HEALTH, health),
        Route(R.FUNCTIONS, leader_only(list_functions), methods=["GET"]),
        Route(R.FUNCTIONS, leader_only(create_function), methods=["POST"]),
        Route(R.FUNCTION, leader_only(get_function), methods=["GET"]),
        Route(R.FUNCTION, leader_only(put_function), methods=["PUT"]),
        Route(R.FUNCTION, leader_only(delete_function), methods=["DELETE"]),
        Route(R.ACQUIRE, leader_only(acquire), methods=["POST"]),
        Route(R.RELEASE, leader_only(release), methods=["POST"]),
        Route(R.INSTANCES, leader_only(list_instances)),
        Route(R.MIGRATE, leader_only(migrate_instance), methods=["POST"]),
        Route(R.INVOKERS, leader_only(list_invokers)),
        Route(R.CHECKPOINTS, leader_only(list_checkpoints)),
    ]
    return Starlette(routes=table, exception_handlers=EXCEPTION_HANDLERS, middleware=MIDDLEWARE,
                     lifespan=lifespan)
