"""The invoker's instance table: loading an instance (fetching its checkpoint first when there
is no current local copy), unloading it, and the two sides of a live migration.

A load reads the checkpoint through the multi-tier loader (:func:`store.checkpoint.load_checkpoint`:
the DRAM tier, else the SSD, with the I/O engine the node chose) while its tokenizer loads in a
second thread, then builds the model over the loaded tensors (:meth:`ModelInstance.from_tensors`).
Loading is idempotent per instance id: the same id again joins the load in progress, or gets
the finished load's answer (a controller that took over re-sends pending loads).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from invoker.config import InvokerConfig, resolve_device
from invoker.fetching import Fetcher
from invoker.instance import ModelInstance
from invoker.migration import Run, Sessions, Target, migrate_instance
from invoker.node import Node
from invoker.threads import in_own_thread
from native_loader import default_reader
from sllm.errors import CheckpointError, Conflict, InstanceNotFound
from sllm.manifest import Scheduling
from sllm.messages import (
    LoadRequest,
    LoadResponse,
    MigrateRequest,
    MigrateResponse,
    PrefillRequest,
    PrefillResponse,
)
from store.checkpoint import LoadedCheckpoint, load_checkpoint
from store.dram_pool import DramPool
from store.model_store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class LoadedInstance:
    """One loaded instance (the model, and what its generations and migrations share)."""

    instance_id: str
    function: str
    model: str
    instance: ModelInstance
    checkpoint: LoadedCheckpoint  # its tensors back the model; released once unloaded
    load_seconds: float
    loaded_at: float
    response: LoadResponse  # what the load answered (repeated to a controller asking again)
    scheduling: Scheduling = field(default_factory=Scheduling)  # its function's, for its engine
    kv_budget_bytes: int = 0  # its memory less its weights: what its KV caches may take
    lock: threading.Lock = field(default_factory=threading.Lock)  # a migration's prefill, close
    runs: dict[str, Run] = field(default_factory=dict)  # generations started and not ended
    moving: MigrateRequest | None = None  # migrating away: new generations hand over at once
    migrating: bool = False  # a migration (of all its generations or some) is under way
    closed: bool = False  # set under ``lock`` once unloaded: the weights may be reused
    stoppers: list[Callable[[], None]] = field(default_factory=list)  # its engine's close

    def close_when_idle(self) -> None:
        """Blocking: stop what computes on the instance (its engine, after its current
        iteration; a migration's prefill), then give the weights' memory back to the DRAM
        pool. After this nothing may touch the model."""
        for stop in self.stoppers:
            stop()
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


class Instances:
    """The instances loaded on this invoker.

    Args:
        config: the invoker's configuration.
        store: the local model store.
        node: the DRAM pool, the I/O engine, and where measured bandwidths and tiers go.
        fetcher: fetches a checkpoint the store lacks.
    """

    def __init__(self, config: InvokerConfig, store: ModelStore, node: Node,
                 fetcher: Fetcher) -> None:
        self._config = config
        self._store = store
        self._node = node
        self._fetcher = fetcher
        self.loaded: dict[str, LoadedInstance] = {}
        self._loading: dict[str, asyncio.Task[LoadResponse]] = {}
        self.tokenizers = TokenizerCache()
        self.sessions = Sessions()  # KV caches prepared for generations migrating here
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=120.0),
                                      limits=httpx.Limits(keepalive_expiry=2.0))

    def get(self, instance_id: str) -> LoadedInstance:
        """The loaded instance. Raises InstanceNotFound."""
        inst = self.loaded.get(instance_id)
        if inst is None:
            raise InstanceNotFound(f"no instance {instance_id!r} on this invoker")
        return inst

    async def close(self) -> None:
        await self.http.aclose()

    # --- loading --------------------------------------------------------------------------------

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
        done = self.loaded.get(iid)
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
        device = resolve_device(req.device, self._config.device)
        t_fetch = time.monotonic()
        transfer = await self._fetcher.fetch(req.model, req.sources)
        transfer_s = time.monotonic() - t_fetch if transfer is not None else 0.0
        path = self._store.path(req.model)
        pool = await self._node.pool()
        t0 = time.monotonic()
        instance, ckpt = await asyncio.to_thread(self._load_blocking, path, device, pool)
        seconds = time.monotonic() - t0
        tier = "remote" if transfer is not None else ckpt.tier
        kv_budget = max(0, req.memory_bytes - ckpt.nbytes)
        resp = LoadResponse(
            instance_id=iid, device=device, nbytes=ckpt.nbytes, load_seconds=seconds + transfer_s,
            read_seconds=ckpt.seconds, tier=tier, transfer_seconds=transfer_s,
            transferred_bytes=transfer.transferred if transfer is not None else 0,
            source=transfer.source if transfer is not None else None,
            kv_budget_bytes=kv_budget, kv_budget_tokens=kv_budget // instance.kv_bytes_per_token,
        )
        self.loaded[iid] = LoadedInstance(
            instance_id=iid, function=req.function, model=req.model, instance=instance,
            checkpoint=ckpt, load_seconds=seconds, loaded_at=time.time(), response=resp,
            scheduling=req.scheduling, kv_budget_bytes=kv_budget,
        )
        log.info("loaded instance %s (%s, %s tier, %d bytes read) in %.3f s%s", iid, req.model,
                 tier, ckpt.nbytes, seconds,
                 f" after a {transfer_s:.3f} s transfer from {transfer.source}" if transfer else "")
        self._node.observe("dram" if ckpt.tier == "dram" else "ssd", ckpt.nbytes, ckpt.seconds)
        await self._node.publish_tiers()
        return resp

    def _load_blocking(
        self, path: Path, device: str, pool: DramPool | None
    ) -> tuple[ModelInstance, LoadedCheckpoint]:
        # the tokenizer loads in a second thread while the checkpoint is read (its reads run in
        # the native engine's threads, without the GIL), or comes from the cache
        config = self._config
        with ThreadPoolExecutor(1, thread_name_prefix="sllm-tokenizer") as ex:
            tokenizer = ex.submit(self.tokenizers.get, path)
            with default_reader(config.read_threads, engine=self._node.io_engine) as reader:
                ckpt = load_checkpoint(path, device=device, verify=config.verify_checksums,
                                       pool=pool, reader=reader,
                                       chunk_bytes=config.read_chunk_bytes)
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
        inst = self.loaded.pop(instance_id, None)
        if inst is None:
            raise InstanceNotFound(f"no instance {instance_id!r} on this invoker")
        for run in list(inst.runs.values()):
            run.hand_over(Target(reason="preempted"))
        self.sessions.drop_instance(instance_id)
        await asyncio.to_thread(inst.close_when_idle)
        log.info("unloaded instance %s", instance_id)
        await self._node.publish_tiers()

    # --- live migration (ServerlessLLM §5) -------------------------------------------------------

    async def migrate(self, instance_id: str, req: MigrateRequest) -> MigrateResponse:
        """As a migration's source: move the instance's generations to another instance
        (:mod:`invoker.migration`). Generations that start on it from now on hand over at once;
        after an abandoned migration they run here again. With ``req.limit`` only that many
        running generations move, and the instance goes on serving the rest and new ones.

        Raises:
            InstanceNotFound: no such instance.
            Conflict: it is migrating already, or the destination is this very instance.
            MigrationFailed: the destination failed before anything moved.
        """
        inst = self.get(instance_id)
        if inst.moving is not None or inst.migrating:
            raise Conflict(f"instance {instance_id!r} is migrating already")
        if req.to_instance == instance_id:
            raise Conflict("an instance cannot migrate to itself")
        inst.migrating = True
        if req.limit is None:
            inst.moving = req
        try:
            resp = await migrate_instance(inst.runs, req, self.http)
        except BaseException:
            inst.moving = None
            raise
        finally:
            inst.migrating = False
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
        return await asyncio.to_thread(in_own_thread, self.sessions.prefill, instance_id,
                                       inst.instance, inst.lock, req)  # (invoker.threads)
