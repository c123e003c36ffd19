"""Fetch coordination: making sure the local store holds a current copy of a checkpoint, one
transfer per model however many callers want it (:func:`store.transfer.fetch_checkpoint` does
the copying, from peer invokers in order, then the store root).

A load's fetch runs to the end. A replication's (the controller's burst-ready copies ahead of
any load, :mod:`controller.replication`) runs in the background and can be paused while a burst
needs the cores and disks, until a load joins it; its partial data is kept, and the next fetch
continues it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from invoker.config import InvokerConfig
from invoker.node import Node
from sllm.messages import ReplicateRequest, ReplicateResponse, ReplicationPaused
from store.checkpoint.format import INDEX_NAME
from store.model_store import ModelStore, validate_name
from store.transfer import TransferResult, fetch_checkpoint

log = logging.getLogger(__name__)


@dataclass
class _Fetching:
    """A fetch of a checkpoint into the local store, in progress."""

    task: asyncio.Task[TransferResult]
    cancel: threading.Event  # set: the fetch stops at its next piece (a pause)
    pausable: bool  # only replications wait on it (no load has joined)


class Fetcher:
    """Fetches into one local store.

    Args:
        config: the invoker's configuration (its store root and network cap).
        store: the local store.
        node: told of every transfer's bandwidth and of the tiers that changed.
    """

    def __init__(self, config: InvokerConfig, store: ModelStore, node: Node) -> None:
        self._config = config
        self._store = store
        self._node = node
        # the store root, unless it is this invoker's own store (then nothing is ever fetched)
        origin = config.origin
        self._origin = (None if origin is None or origin.resolve() == store.root.resolve()
                        else origin)
        self._fetching: dict[str, _Fetching] = {}  # model -> its fetch in progress
        self._stale_cache: dict[str, tuple[tuple[int, int, int, int], bool]] = {}

    def _stale(self, model: str) -> bool:
        """Whether the local copy of ``model`` is missing or differs from the store root's
        (compared by index.json; the answer is cached per version of both indexes, so a load
        of an unchanged model costs two stat calls)."""
        if not self._store.exists(model):
            return True
        if self._origin is None:
            return False
        origin, local = self._origin / model / INDEX_NAME, self._store.root / model / INDEX_NAME
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
                fetch_checkpoint, model, self._store, sources, cancel=cancel,
                rate_bps=self._config.network_bps))
            fetching = self._fetching[model] = _Fetching(task, cancel, pausable=background)
            task.add_done_callback(lambda _: self._fetching.pop(model, None))
        elif not background:
            fetching.pausable = False  # a load waits on it now: it runs to the end
        result = await asyncio.shield(fetching.task)
        self._node.observe("network", result.transferred, result.seconds)
        await self._node.publish_tiers()
        return result

    async def replicate(self, model: str, req: ReplicateRequest) -> ReplicateResponse:
        """Hold a current copy of ``model`` in the local store ahead of any load of it:
        :meth:`fetch` from ``req.sources`` in order, then the store root, in the background
        (pausable). Idempotent: a current copy moves nothing, and a fetch of the model in
        progress (a load's or another replication's) is joined, not repeated.

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
