"""The node: what this invoker tells the cluster about itself, and the machine resources its
loads share.

- its etcd record (:class:`~sllm.messages.InvokerRecord`: URL, device, memory budget, measured
  bandwidths, I/O engine) under a lease it keeps alive, so that the controller sees it die;
- the checkpoint tiers of its store (:class:`~invoker.tiers.TierPublisher`);
- its bandwidths, probed at start-up and then measured from its own loads and transfers
  (:mod:`invoker.bandwidth`), for the scheduler's startup-time estimates;
- the DRAM tier (:class:`~store.dram_pool.DramPool`), allocated and pre-faulted at start-up;
- the I/O engine its checkpoint reads use (:func:`native_loader.choose_engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

from invoker.bandwidth import BandwidthMeter, Kind, probe
from invoker.config import InvokerConfig
from invoker.threads import in_own_thread
from invoker.tiers import TierPublisher
from invoker.warmup import warm_up
from native_loader import choose_engine
from sllm import keys
from sllm.errors import SllmError
from sllm.etcd import Etcd
from sllm.messages import InvokerRecord
from store.dram_pool import DramPool
from store.model_store import ModelStore

log = logging.getLogger(__name__)


class Node:
    """This invoker's registration, publishing and shared resources.

    Args:
        config: the invoker's configuration.
        store: its local model store.

    Raises:
        ValueError: an unknown ``config.io_engine``.
    """

    def __init__(self, config: InvokerConfig, store: ModelStore) -> None:
        self.config = config
        self.etcd = Etcd(config.etcd_endpoint)
        self.meter: BandwidthMeter | None = None  # once the start-up probe ran
        self.lease_id: int | None = None
        self.tiers = TierPublisher(self.etcd, config.invoker_id, store)
        self.io_engine, self.io_engine_problem = choose_engine(config.io_engine)
        self._pool: asyncio.Future[DramPool] | None = None
        self._started = time.time()
        self._background: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    @property
    def degraded(self) -> bool:
        """Whether this invoker runs without something it was built to have: the native I/O
        engine it was asked to use."""
        return self.config.io_engine == "native" and self.io_engine != "native"

    # --- the DRAM tier --------------------------------------------------------------------------

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

    # --- the record and the tiers ---------------------------------------------------------------

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

    def observe(self, kind: Kind, nbytes: int, seconds: float) -> None:
        """A load or transfer moved ``nbytes`` in ``seconds`` from ``kind``: update the measured
        bandwidth, and when it changed, re-publish the record off the caller's path (the
        scheduler reads bandwidths for later decisions, not the one being answered)."""
        if self.meter is not None and self.meter.observe(kind, nbytes, seconds):
            task = asyncio.create_task(self.publish_record())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def publish_tiers(self) -> None:
        """Re-publish checkpoint tiers that changed; failures are logged (the next sync retries)."""
        try:
            await self.tiers.sync(await self.pool(), self.lease_id)
        except SllmError as e:
            log.warning("publishing checkpoint tiers failed: %s", e.message)

    async def _run_tier_sync(self) -> None:
        """Background task: re-publish the tiers every ``tier_sync_s`` seconds (the store
        changes under the invoker too: imports, removals)."""
        while True:
            await self.publish_tiers()
            await asyncio.sleep(self.config.tier_sync_s)

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Get ready, then join the cluster: say what is wrong with the I/O engine (an error
        when ``native`` was asked for: /health says degraded), allocate the DRAM pool while the
        device warms up (:func:`invoker.warmup.warm_up`, in a thread of its own), probe the
        bandwidths, and only then register (no cold start waits for a warm-up) and keep the
        lease alive.

        Raises:
            RuntimeError: the device cannot be used (the warm-up's error).
            Unavailable: etcd is away.
        """
        config = self.config
        if self.io_engine_problem is not None:
            (log.error if self.degraded else log.warning)(
                "invoker %s: %s%s", config.invoker_id, self.io_engine_problem,
                " (it was started with --io-engine native: /health says degraded)"
                if self.degraded else "")
        self.start_pool()  # pre-faults in a thread (~0.45 s per GiB here) while the warm-up runs
        await asyncio.to_thread(in_own_thread, warm_up, config.device)  # (invoker.threads)
        seed = await asyncio.to_thread(probe, config.store_root, engine=self.io_engine)
        if config.network_bps is not None:  # a capped link is no faster than its cap
            seed = dataclasses.replace(seed, write_bps=min(seed.write_bps, config.network_bps))
        self.meter = BandwidthMeter(seed)
        log.info("bandwidth probe: DRAM %.2f GB/s, SSD %.2f GB/s, write %.2f GB/s",
                 seed.dram_bps / 1e9, seed.ssd_bps / 1e9, seed.write_bps / 1e9)
        await self.pool()  # registered only once warm and pre-faulted
        lease = await self.register()
        for work in (self.etcd.keep_alive(lease, config.lease_ttl_s, self._stop,
                                          on_expired=self.register),
                     self._run_tier_sync()):
            task = asyncio.create_task(work)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Leave the cluster: stop the background work and revoke the lease (the controller
        sees this invoker gone at once)."""
        self._stop.set()
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(Exception):
            if self.lease_id is not None:
                await self.etcd.revoke_lease(self.lease_id)
        await self.etcd.close()
