"""The invoker service: one per node. It loads instances from the local model store and runs
their generations.

HTTP API (JSON; errors in the OpenAI-shaped envelope of :mod:`sllm.errors`):

- ``POST /v1/instances`` (:class:`~sllm.messages.LoadRequest`) -> :class:`~sllm.messages.LoadResponse`
  once the instance is loaded; ``GET /v1/instances``; ``DELETE /v1/instances/{id}``. A load
  first fetches the checkpoint into the local store when there is no copy (or a stale one) from
  the peers the request names, then the store root (:mod:`store.transfer`). Loading is
  idempotent: the same instance id again joins the load in progress, or gets the answer of the
  finished one (a controller that took over re-sends pending loads).
- ``GET /v1/checkpoints/{model}`` and ``GET /v1/checkpoints/{model}/files/{path}`` (with Range):
  the local checkpoints, for other invokers to fetch (:mod:`store.files_api`);
  ``PUT /v1/checkpoints/{model}`` (:class:`~sllm.messages.ReplicateRequest`) ->
  :class:`~sllm.messages.ReplicateResponse`: fetch a copy ahead of any load (the controller's
  burst-ready replication), joining a fetch of the model in progress;
  ``DELETE /v1/checkpoints/{model}/replication`` -> :class:`~sllm.messages.ReplicationPaused`:
  pause that copy (a burst needs the cores and disks; its partial data is kept)
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
- ``GET /health``: status, id, and the threads it computes with (``compute_threads``)

The invoker registers itself in etcd under a lease it keeps alive, so the controller sees it die;
its record carries its bandwidths, probed at start-up and then measured from its own loads and
transfers (:mod:`invoker.bandwidth`), for the scheduler's startup-time estimates.
Blocking work (checkpoint loading, generation) runs in threads; a per-instance lock lets one
generation use an instance at a time (token-level scheduling comes with the FastServe issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoTokenizer

from invoker.bandwidth import BandwidthMeter, probe
from invoker.generation import Generation, Resume
from invoker.instance import ModelInstance
from invoker.migration import Run, Sessions, Target, migrate_instance
from invoker.tiers import TierPublisher
from invoker.warmup import warm_up
from native_loader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, choose_engine, default_reader
from sllm import keys, routes
from sllm.config import INVOKER_LEASE_TTL_S
from sllm.errors import (
    CheckpointError,
    Conflict,
    InstanceNotFound,
    InternalError,
    SllmError,
    Unavailable,
)
from sllm.etcd import Etcd
from sllm.http import EXCEPTION_HANDLERS, MIDDLEWARE, model_response, read_model
from sllm.messages import (
    DoneMessage,
    ErrorBody,
    ErrorMessage,
    GenerateRequest,
    InvokerRecord,
    LoadRequest,
    LoadResponse,
    MigratedMessage,
    MigrateRequest,
    MigrateResponse,
    PrefillRequest,
    PrefillResponse,
    ReplicateRequest,
    ReplicateResponse,
    ReplicationPaused,
    TokenMessage,
)
from sllm.sampling import SamplingParams
from store.checkpoint import LoadedCheckpoint, load_checkpoint
from store.checkpoint.format import INDEX_NAME
from store.dram_pool import DramPool
from store.files_api import checkpoint_file_routes
from store.model_store import ModelStore, validate_name
from store.transfer import TransferResult, fetch_checkpoint

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.05
"""Seconds between two checks of a generation waiting for its instance: whether it was handed
over (a migration or an unload) meanwhile."""


@dataclass
class InvokerConfig:
    invoker_id: str
    url: str  # how others reach this invoker: http://host:port
    etcd_endpoint: str
    store_root: Path
    device: str = "cpu"  # where "auto" instances go
    memory_bytes: int = 8 << 30  # instance memory budget advertised to the controller
    verify_checksums: bool = True
    dram_pool_bytes: int = 4 << 30  # the DRAM tier's budget; 0 disables it
    read_threads: int = DEFAULT_THREADS  # the native reader's threads per load
    read_chunk_bytes: int = DEFAULT_CHUNK_BYTES  # bytes per read request
    tier_sync_s: float = 5.0  # how often checkpoint tiers are re-published (store changes)
    origin: Path | None = None  # the store root: where checkpoints come from with no local copy
    lease_ttl_s: int = INVOKER_LEASE_TTL_S  # the controller sees this invoker dead this long after
    network_bps: float | None = None  # cap on checkpoint fetches (bytes/s): an emulated link
    io_engine: str = "auto"  # checkpoint reads: "native" (this invoker was built for the C++
    # engine: without it, it runs degraded and says so), "python", or "auto" (native if built)


@dataclass
class LoadedInstance:
    instance_id: str
    function: str
    model: str
    instance: ModelInstance
    checkpoint: LoadedCheckpoint  # its tensors back the model; released once unloaded
    load_seconds: float
    loaded_at: float
    response: LoadResponse  # what the load answered (repeated to a controller asking again)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time
    runs: dict[str, Run] = field(default_factory=dict)  # generations started and not ended
    moving: MigrateRequest | None = None  # migrating away: new generations hand over at once
    closed: bool = False  # set under ``lock`` once unloaded: the weights may be reused

    def close_when_idle(self) -> None:
        """Blocking: wait for the running generation (if any), then give the weights' memory
        back to the DRAM pool. After this no generation may touch the model."""
        with self.lock:
            self.closed = True
            self.checkpoint.release()


class TokenizerCache:
    """Loaded tokenizers by checkpoint folder, least recently used out. Loading one takes
    0.1-0.3 s, as long as a whole DRAM-tier load; instances of a model share its tokenizer
    (encoding and decoding only read it). A checkpoint replaced in the store (a new
    ``index.json``) gets a fresh entry.

    Args:
        capacity: tokenizers kept.
    """

    def __init__(self, capacity: int = 16) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def get(self, path: Path) -> Any:
        """The tokenizer of the checkpoint at ``path`` (blocking on a miss).

        Raises:
            OSError, ValueError: transformers cannot load it.
        """
        key = (str(path), (path / "index.json").stat().st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        tok = AutoTokenizer.from_pretrained(path)
        with self._lock:
            self._items[key] = tok
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return tok


@dataclass
class _Fetching:
    """A fetch of a checkpoint into the local store, in progress."""

    task: asyncio.Task[TransferResult]
    cancel: threading.Event  # set: the fetch stops at its next piece (a pause)
    pausable: bool  # only replications wait on it (no load has joined)


def resolve_device(requested: str, default: str) -> str:
    """The torch device for an instance: ``auto`` -> the invoker's device ``default``; ``cuda``
    -> ``default`` when that is a GPU, else ``cuda:0``; ``cpu`` and ``cuda:N`` as they are.
    Raises Unavailable when CUDA is asked for on an invoker without it."""
    if requested == "auto":
        return default
    if requested.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise Unavailable(f"device {requested!r} requested but this invoker has no CUDA device")
        if requested == "cuda":
            return default if default.startswith("cuda") else "cuda:0"
    return requested


class Invoker:
    """The invoker's instances and its etcd registration."""

    def __init__(self, config: InvokerConfig) -> None:
        self.config = config
        self.store = ModelStore(config.store_root)
        self.etcd = Etcd(config.etcd_endpoint)
        self.instances: dict[str, LoadedInstance] = {}
        self._loading: dict[str, asyncio.Task[LoadResponse]] = {}
        self._fetching: dict[str, _Fetching] = {}  # model -> its fetch in progress
        # the store root, unless it is this invoker's own store (then nothing is ever fetched)
        origin = config.origin
        self._origin = (None if origin is None or origin.resolve() == self.store.root.resolve()
                        else origin)
        self._stale_cache: dict[str, tuple[tuple[int, int, int, int], bool]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.meter: BandwidthMeter | None = None  # once the start-up probe ran
        self.lease_id: int | None = None
        self.tiers = TierPublisher(self.etcd, config.invoker_id, self.store)
        self.tokenizers = TokenizerCache()
        self.sessions = Sessions()  # KV caches prepared for generations migrating here
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=120.0),
                                      limits=httpx.Limits(keepalive_expiry=2.0))
        self._pool: asyncio.Future[DramPool] | None = None
        self._started = time.time()
        # raises ValueError for an unknown engine
        self.io_engine, self.io_engine_problem = choose_engine(config.io_engine)

    @property
    def degraded(self) -> bool:
        """Whether this invoker runs without something it was built to have: the native I/O
        engine it was asked to use."""
        return self.config.io_engine == "native" and self.io_engine != "native"

    def start_pool(self) -> None:
        """Allocate and pre-fault the DRAM pool in a thread; :meth:`pool` waits for it."""
        self._pool = asyncio.get_running_loop().run_in_executor(
            None, DramPool, self.config.dram_pool_bytes
        )

    async def pool(self) -> DramPool | None:
        """The DRAM pool once it is ready (None when disabled)."""
        if self._pool is None or self.config.dram_pool_bytes == 0:
            return None
        return await self._pool

    async def publish_tiers(self) -> None:
        """Re-publish checkpoint tiers that changed; failures are logged (the next sync retries)."""
        try:
            await self.tiers.sync(await self.pool(), self.lease_id)
        except SllmError as e:
            log.warning("publishing checkpoint tiers failed: %s", e.message)

    def record(self) -> InvokerRecord:
        """This invoker's record, with its current bandwidths."""
        return InvokerRecord(
            id=self.config.invoker_id, url=self.config.url, device=self.config.device,
            memory_bytes=self.config.memory_bytes, started=self._started, pid=os.getpid(),
            bandwidths=self.meter.snapshot() if self.meter is not None else None,
            io_engine=self.io_engine,
        )

    async def register(self) -> int:
        """Write this invoker's record under a fresh lease; returns the lease id."""
        lease = await self.etcd.grant_lease(self.config.lease_ttl_s)
        await self.etcd.put(keys.Kind.INVOKER, self.config.invoker_id, self.record(), lease=lease)
        self.lease_id = lease
        self.tiers.forget()  # records live on the lease: a new lease needs them all again
        log.info("invoker %s registered at %s (lease %x)", self.config.invoker_id, self.config.url, lease)
        return lease

    async def publish_record(self) -> None:
        """Re-write this invoker's record (its bandwidths changed); failures are logged."""
        if self.lease_id is None:
            return
        try:
            await self.etcd.put(keys.Kind.INVOKER, self.config.invoker_id, self.record(),
                                lease=self.lease_id)
        except SllmError as e:
            log.warning("publishing the invoker record failed: %s", e.message)

    def publish_record_soon(self) -> None:
        """:meth:`publish_record` in a task of its own, off the load's path (the scheduler
        reads bandwidths for later decisions, not for the one being answered)."""
        task = asyncio.create_task(self.publish_record())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def load(self, req: LoadRequest) -> LoadResponse:
        """Load an instance (fetching its checkpoint first when there is no local copy) and
        build its model, in threads. Idempotent per instance id: a repeat joins the load in
        progress or gets the finished load's answer.

        Raises:
            Conflict: the id is taken by an instance of another model.
            ModelNotFound: no source has the checkpoint.
            CheckpointError: the checkpoint is corrupt (locally and at every source).
            Unavailable: the sources are unreachable, or CUDA is asked for without a GPU.
        """
        iid = req.instance_id
        done = self.instances.get(iid)
        if done is not None:
            if done.model != req.model:
                raise Conflict(f"instance {iid!r} is loaded with another model ({done.model})")
            return done.response
        task = self._loading.get(iid)
        if task is None:
            task = asyncio.create_task(self._load(req))
            self._loading[iid] = task
            task.add_done_callback(lambda _: self._loading.pop(iid, None))
        # shielded: a controller that goes away mid-load does not undo it; its successor asks again
        return await asyncio.shield(task)

    async def _load(self, req: LoadRequest) -> LoadResponse:
        iid = req.instance_id
        device = resolve_device(req.device, self.config.device)
        t_fetch = time.monotonic()
        transfer = await self.fetch(req.model, req.sources)
        transfer_s = time.monotonic() - t_fetch if transfer is not None else 0.0
        path = self.store.path(req.model)
        pool = await self.pool()
        t0 = time.monotonic()
        instance, ckpt = await asyncio.to_thread(self._load_blocking, path, device, pool)
        seconds = time.monotonic() - t0
        tier = "remote" if transfer is not None else ckpt.tier
        resp = LoadResponse(
            instance_id=iid, device=device, nbytes=ckpt.nbytes, load_seconds=seconds + transfer_s,
            read_seconds=ckpt.seconds, tier=tier, transfer_seconds=transfer_s,
            transferred_bytes=transfer.transferred if transfer is not None else 0,
            source=transfer.source if transfer is not None else None,
        )
        self.instances[iid] = LoadedInstance(
            instance_id=iid, function=req.function, model=req.model, instance=instance,
            checkpoint=ckpt, load_seconds=seconds, loaded_at=time.time(), response=resp,
        )
        log.info("loaded instance %s (%s, %s tier, %d bytes read) in %.3f s%s", iid, req.model,
                 tier, ckpt.nbytes, seconds,
                 f" after a {transfer_s:.3f} s transfer from {transfer.source}" if transfer else "")
        if self.meter is not None and self.meter.observe(
            "dram" if ckpt.tier == "dram" else "ssd", ckpt.nbytes, ckpt.seconds
        ):
            self.publish_record_soon()
        await self.publish_tiers()
        return resp

    def _stale(self, model: str) -> bool:
        """Whether the local copy of ``model`` is missing or differs from the store root's
        (compared by index.json; the answer is cached per version of both indexes, so a load
        of an unchanged model costs two stat calls)."""
        if not self.store.exists(model):
            return True
        if self._origin is None:
            return False
        origin, local = self._origin / model / INDEX_NAME, self.store.root / model / INDEX_NAME
        try:
            o, lo = origin.stat(), local.stat()
            versions = (o.st_mtime_ns, o.st_size, lo.st_mtime_ns, lo.st_size)
            cached = self._stale_cache.get(model)
            if cached is None or cached[0] != versions:
                cached = (versions, origin.read_bytes() != local.read_bytes())
                self._stale_cache[model] = cached
            return cached[1]
        except OSError:
            return False  # not in the root (any more): the local copy is all there is

    async def fetch(self, model: str, peers: list[str], *,
                    background: bool = False) -> TransferResult | None:
        """Make sure the local store holds a current copy of ``model``: None when it already
        did, else the transfer that fetched it (from ``peers`` in order, then the store root).
        Concurrent calls for one model share one transfer. A ``background`` fetch (a
        replication's) can be paused (:meth:`pause_replication`) until a foreground caller (a
        load) joins it; from then on it runs to the end. A caller that finds a paused fetch
        still stopping waits for it to stop, then fetches anew (continuing its partial data).

        Raises:
            ModelNotFound, CheckpointError, Unavailable: see store.transfer.fetch_checkpoint
            (Unavailable too when the fetch was paused).
        """
        if not self._stale(model):
            return None
        fetching = self._fetching.get(model)
        if fetching is not None and fetching.cancel.is_set():
            # a paused replication, stopping: let it stop (its partial data stays), then
            # fetch anew, continuing that data
            await asyncio.wait([fetching.task])
            return await self.fetch(model, peers, background=background)
        if fetching is None:
            sources: list[str | Path] = [*peers]
            if self._origin is not None:
                sources.append(self._origin)
            cancel = threading.Event()
            task = asyncio.create_task(asyncio.to_thread(
                fetch_checkpoint, model, self.store, sources, cancel=cancel,
                rate_bps=self.config.network_bps))
            fetching = self._fetching[model] = _Fetching(task, cancel, pausable=background)
            task.add_done_callback(lambda _: self._fetching.pop(model, None))
        elif not background:
            fetching.pausable = False  # a load waits on it now: it runs to the end
        result = await asyncio.shield(fetching.task)
        if self.meter is not None and self.meter.observe("network", result.transferred, result.seconds):
            self.publish_record_soon()
        await self.publish_tiers()
        return result

    async def replicate(self, model: str, req: ReplicateRequest) -> ReplicateResponse:
        """Hold a current copy of ``model`` in the local store ahead of any load of it (the
        controller's burst-ready replication, :mod:`controller.replication`): :meth:`fetch`
        from ``req.sources`` in order, then the store root, in the background (pausable).
        Idempotent: a current copy moves nothing, and a fetch of the model in progress (a
        load's or another replication's) is joined, not repeated.

        Raises:
            InvalidRequest: a bad model name.
            ModelNotFound, CheckpointError: see :meth:`fetch`.
            Unavailable: see :meth:`fetch`; also when :meth:`pause_replication` paused it (its
                partial data is kept: the next replication or load continues it).
        """
        result = await self.fetch(model, req.sources, background=True)  # the store checks the name
        if result is None:
            return ReplicateResponse(model=model, transferred_bytes=0, seconds=0.0)
        log.info("replicated %s: %d bytes from %s in %.3f s", model, result.transferred,
                 result.source, result.seconds)
        return ReplicateResponse(model=model, transferred_bytes=result.transferred,
                                 seconds=result.seconds, source=result.source)

    def pause_replication(self, model: str) -> ReplicationPaused:
        """Pause the replication of ``model`` in progress: its fetch stops at its next piece
        (the waiting :meth:`replicate` raises Unavailable) and keeps its partial data. A fetch
        a load waits on is never paused: ``paused`` is False then, and when none runs.

        Raises:
            InvalidRequest: a bad model name.
        """
        validate_name(model)
        fetching = self._fetching.get(model)
        if fetching is None or not fetching.pausable:
            return ReplicationPaused(model=model, paused=False)
        fetching.pausable = False
        fetching.cancel.set()
        log.info("replication of %s paused", model)
        return ReplicationPaused(model=model, paused=True)

    def _load_blocking(
        self, path: Path, device: str, pool: DramPool | None
    ) -> tuple[ModelInstance, LoadedCheckpoint]:
        # the tokenizer loads in a second thread while the checkpoint is read (its reads run in
        # the native engine's threads, without the GIL), or comes from the cache
        with ThreadPoolExecutor(1, thread_name_prefix="sllm-tokenizer") as ex:
            tokenizer = ex.submit(self.tokenizers.get, path)
            with default_reader(self.config.read_threads, engine=self.io_engine) as reader:
                ckpt = load_checkpoint(path, device=device, verify=self.config.verify_checksums,
                                       pool=pool, reader=reader,
                                       chunk_bytes=self.config.read_chunk_bytes)
            try:
                try:
                    tok = tokenizer.result()
                except (OSError, ValueError, KeyError) as e:
                    raise CheckpointError(f"{path}: cannot load the tokenizer: {e}") from e
                instance = ModelInstance.from_tensors(path, ckpt.tensors, device=device,
                                                      tokenizer=tok)
            except BaseException:
                ckpt.release()
                raise
        return instance, ckpt

    async def unload(self, instance_id: str) -> None:
        """Forget an instance, hand its running generations back to the gateway to resume
        elsewhere (preemption), and give its weights' memory back to the DRAM pool once they
        have stopped. Raises InstanceNotFound."""
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            raise InstanceNotFound(f"no instance {instance_id!r} on this invoker")
        for run in list(inst.runs.values()):
            run.hand_over(Target(reason="preempted"))
        self.sessions.drop_instance(instance_id)
        await asyncio.to_thread(inst.close_when_idle)
        log.info("unloaded instance %s", instance_id)
        await self.publish_tiers()

    def get(self, instance_id: str) -> LoadedInstance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise InstanceNotFound(f"no instance {instance_id!r} on this invoker")
        return inst

    async def migrate(self, instance_id: str, req: MigrateRequest) -> MigrateResponse:
        """Move the instance's generations to another instance (:mod:`invoker.migration`).
        Generations that start on it from now on hand over at once; after an abandoned
        migration they run here again.

        Raises:
            InstanceNotFound: no such instance.
            Conflict: it is migrating already, or the destination is this very instance.
            MigrationFailed: the destination failed before anything moved.
        """
        inst = self.get(instance_id)
        if inst.moving is not None:
            raise Conflict(f"instance {instance_id!r} is migrating already")
        if req.to_instance == instance_id:
            raise Conflict("an instance cannot migrate to itself")
        inst.moving = req
        try:
            resp = await migrate_instance(inst.runs, req, self.http)
        except BaseException:
            inst.moving = None
            raise
        if resp.abandoned is not None:
            inst.moving = None
        log.info("instance %s migrated to %s: %d moved, %d finished first, %d rounds, %d tokens "
                 "in %.3f s%s", instance_id, req.to_instance, resp.moved, resp.finished,
                 resp.rounds, resp.tokens, resp.seconds,
                 f" (abandoned: {resp.abandoned})" if resp.abandoned else "")
        return resp

    async def prefill(self, instance_id: str, req: PrefillRequest) -> PrefillResponse:
        """As a migration's destination: extend a session's KV cache (in a thread).

        Raises:
            InstanceNotFound, Conflict, InvalidRequest: see :meth:`Sessions.prefill`.
        """
        inst = self.get(instance_id)
        self.sessions.expire()
        if inst.closed:
            raise InstanceNotFound(f"instance {instance_id!r} was unloaded")
        return await asyncio.to_thread(self.sessions.prefill, instance_id, inst.instance,
                                       inst.lock, req)


def _run_generation(
    inst: LoadedInstance, run: Run, params: SamplingParams, resume: Resume | None,
    cancel: threading.Event, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None],
) -> None:
    """Worker thread: run one generation and post NDJSON lines to ``queue`` (None at the end)."""
    def post(line: str | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, line)

    reason = "error"
    try:
        # waiting for the instance (another generation runs on it): one handed over meanwhile
        # leaves at once, with nothing to stop; none starts while the instance migrates away
        acquired = False
        while not run.handed_over:
            if inst.lock.acquire(timeout=LOCK_POLL_S):
                if inst.moving is None or run.handed_over:
                    acquired = True
                    break
                inst.lock.release()
                time.sleep(LOCK_POLL_S)
        with contextlib.ExitStack() as held:
            if acquired:
                held.callback(inst.lock.release)
            if run.handed_over:
                reason = "migrated"
                moved = list(resume.token_ids) if resume is not None else []
                post(_migrated(run, moved, 0.0, 0.0).model_dump_json())
                return
            if inst.closed:
                raise InstanceNotFound(f"instance {inst.instance_id!r} was unloaded")
            gen = Generation(inst.instance, run.prompt_ids, params, cancel=cancel,
                             handoff=run.handoff, resume=resume)
            run.generation = gen
            for tok in gen:
                post(TokenMessage(index=tok.index, token_id=tok.token_id, text=tok.text).model_dump_json())
            reason = gen.finish_reason or "stop"
            if reason == "migrated":
                msg = _migrated(run, gen.token_ids, gen.prefill_seconds, gen.decode_seconds)
                post(msg.model_dump_json())
                return
            done = DoneMessage(
                finish_reason=reason, prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens, prefill_seconds=gen.prefill_seconds,
                decode_seconds=gen.decode_seconds,
            )
            post(done.model_dump_json())
    except SllmError as e:
        post(ErrorMessage(error=ErrorBody(**e.to_body()["error"])).model_dump_json())
    except Exception as e:  # a bug or a torch failure: report it in the stream, never hang
        log.exception("generation failed")
        err = InternalError(f"generation failed: {type(e).__name__}: {e}")
        post(ErrorMessage(error=ErrorBody(**err.to_body()["error"])).model_dump_json())
    finally:
        run.end(reason)
        post(None)


def _migrated(run: Run, token_ids: list[int], prefill_s: float, decode_s: float) -> MigratedMessage:
    target = run.target or Target(reason="preempted")
    return MigratedMessage(
        token_ids=list(token_ids), prompt_tokens=len(run.prompt_ids), prefill_seconds=prefill_s,
        decode_seconds=decode_s, invoker_url=target.invoker_url, instance_id=target.instance_id,
        session=target.session, reason=target.reason,
    )


def create_app(config: InvokerConfig) -> Starlette:
    """The invoker's ASGI app; its lifespan registers in etcd and keeps the lease alive."""
    inv = Invoker(config)

    async def health(request: Request) -> Response:
        import torch

        return JSONResponse({
            "status": "degraded" if inv.degraded else "ok", "component": "invoker",
            "id": config.invoker_id, "compute_threads": torch.get_num_threads(),
            "io_engine": inv.io_engine,
            "problems": [inv.io_engine_problem] if inv.io_engine_problem else [],
        })

    async def load(request: Request) -> Response:
        req = await read_model(request, LoadRequest)
        return model_response(await inv.load(req))

    async def list_instances(request: Request) -> Response:
        return JSONResponse({"instances": [
            {"instance_id": i.instance_id, "function": i.function, "model": i.model,
             "device": str(i.instance.device), "tier": i.checkpoint.tier,
             "load_seconds": i.load_seconds, "loaded_at": i.loaded_at}
            for i in inv.instances.values()
        ]})

    async def unload(request: Request) -> Response:
        await inv.unload(request.path_params["id"])
        return JSONResponse({"unloaded": request.path_params["id"]})

    async def generate(request: Request) -> Response:
        inst = inv.get(request.path_params["id"])
        req = await read_model(request, GenerateRequest)
        given = req.input
        messages = [m.model_dump() for m in given.messages] if given.messages is not None else None
        prompt_ids = await asyncio.to_thread(
            inst.instance.encode, prompt=given.prompt, messages=messages, raw=given.raw
        )
        params = req.sampling
        resume = None
        if req.resume is not None:
            cache, cached = (None, 0)
            if req.resume.session is not None:
                cache, cached = inv.sessions.take(req.resume.session, inst.instance_id,
                                                  [*prompt_ids, *req.resume.token_ids])
            resume = Resume(req.resume.token_ids, req.resume.emitted, cache, cached)
        loop = asyncio.get_running_loop()
        run = Run(prompt_ids, loop)
        if inst.moving is not None:  # assigned before the migration began: follow the others
            run.hand_over(Target(inst.moving.to_url, inst.moving.to_instance))
        inst.runs[run.id] = run
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()
        worker = loop.run_in_executor(None, _run_generation, inst, run, params, resume, cancel,
                                      loop, queue)

        async def lines() -> AsyncIterator[str]:
            try:
                while (line := await queue.get()) is not None:
                    yield line + "\n"
            finally:
                cancel.set()  # the client went away, or we are done: stop the worker
                inst.runs.pop(run.id, None)
                worker.add_done_callback(lambda f: f.exception())

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def migrate(request: Request) -> Response:
        req = await read_model(request, MigrateRequest)
        return model_response(await inv.migrate(request.path_params["id"], req))

    async def prefill(request: Request) -> Response:
        req = await read_model(request, PrefillRequest)
        return model_response(await inv.prefill(request.path_params["id"], req))

    async def replicate(request: Request) -> Response:
        req = await read_model(request, ReplicateRequest)
        return model_response(await inv.replicate(request.path_params["model"], req))

    async def pause_replication(request: Request) -> Response:
        return model_response(inv.pause_replication(request.path_params["model"]))

    async def drop_session(request: Request) -> Response:
        dropped = inv.sessions.drop(request.path_params["session"])
        return JSONResponse({"dropped": dropped})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        if inv.io_engine_problem is not None:
            (log.error if inv.degraded else log.warning)(
                "invoker %s: %s%s", config.invoker_id, inv.io_engine_problem,
                " (it was started with --io-engine native: /health says degraded)"
                if inv.degraded else "")
        inv.start_pool()  # pre-faults in a thread (~0.45 s per GiB here) while the warm-up runs
        await asyncio.to_thread(warm_up, config.device)
        seed = await asyncio.to_thread(probe, config.store_root, engine=inv.io_engine)
        if config.network_bps is not None:  # a capped link is no faster than its cap
            seed = dataclasses.replace(seed, write_bps=min(seed.write_bps, config.network_bps))
        inv.meter = BandwidthMeter(seed)
        log.info("bandwidth probe: DRAM %.2f GB/s, SSD %.2f GB/s, write %.2f GB/s",
                 seed.dram_bps / 1e9, seed.ssd_bps / 1e9, seed.write_bps / 1e9)
        await inv.pool()  # registered only once warm and pre-faulted: no cold start waits for it
        lease = await inv.register()
        keeper = asyncio.create_task(
            inv.etcd.keep_alive(lease, config.lease_ttl_s, stop, on_expired=inv.register)
        )

        async def tier_sync() -> None:
            while True:
                await inv.publish_tiers()
                await asyncio.sleep(config.tier_sync_s)

        syncer = asyncio.create_task(tier_sync())
        app.state.invoker = inv
        try:
            yield
        finally:
            stop.set()
            keeper.cancel()
            syncer.cancel()
            with contextlib.suppress(Exception):
                if inv.lease_id is not None:
                    await inv.etcd.revoke_lease(inv.lease_id)
            await inv.etcd.close()
            await inv.http.aclose()

    R = routes.Invoker
    table = [
        Route(routes.HEALTH, health),
        Route(R.INSTANCES, load, methods=["POST"]),
        Route(R.INSTANCES, list_instances, methods=["GET"]),
        Route(R.INSTANCE, unload, methods=["DELETE"]),
        Route(R.GENERATE, generate, methods=["POST"]),
        Route(R.MIGRATE, migrate, methods=["POST"]),
        Route(R.PREFILL, prefill, methods=["POST"]),
        Route(R.SESSION, drop_session, methods=["DELETE"]),
        Route(R.CHECKPOINT, replicate, methods=["PUT"]),
        Route(R.REPLICATION, pause_replication, methods=["DELETE"]),
        *checkpoint_file_routes(inv.store),
    ]
    return Starlette(routes=table, exception_handlers=EXCEPTION_HANDLERS, middleware=MIDDLEWARE,
                     lifespan=lifespan)
