"""Publishing where each checkpoint sits on this invoker, for the scheduler.

Every model in the invoker's store is at least on the SSD tier; a model whose checkpoint is
cached in the DRAM pool is on the DRAM tier. The publisher writes one
:class:`~sllm.messages.CheckpointRecord` per model under ``/sllm/checkpoints/<invoker>/<model>``,
attached to the invoker's lease (so they vanish with the invoker), and rewrites only what changed
since the last sync.
"""

from __future__ import annotations

import logging
import time

from sllm import keys
from sllm.etcd import Etcd
from sllm.messages import CheckpointRecord
from sllm.tiers import LocalTier
from store.dram_pool import DramPool
from store.model_store import ModelStore

log = logging.getLogger(__name__)


def current_tiers(store: ModelStore, pool: DramPool | None) -> dict[str, tuple[LocalTier, int]]:
    """Model name -> (tier, checkpoint bytes) for every model in the store."""
    cached = {e.label for e in pool.entries()} if pool is not None else set()
    return {m.name: ("dram" if m.name in cached else "ssd", m.nbytes) for m in store.list()}


class TierPublisher:
    """Keeps etcd's checkpoint records of one invoker in step with its store and pool."""

    def __init__(self, etcd: Etcd, invoker_id: str, store: ModelStore) -> None:
        self._etcd = etcd
        self._invoker_id = invoker_id
        self._store = store
        self._published: dict[str, tuple[LocalTier, int]] = {}

    def forget(self) -> None:
        """Drop what was published (the lease changed: everything must be written again)."""
        self._published = {}

    async def sync(self, pool: DramPool | None, lease: int | None) -> None:
        """Write the records that changed and delete those of models gone from the store.

        Raises:
            sllm.errors.Unavailable: etcd is unreachable (the next sync retries).
        """
        want = current_tiers(self._store, pool)
        now = time.time()
        for model, (tier, nbytes) in want.items():
            if self._published.get(model) != (tier, nbytes):
                record = CheckpointRecord(invoker_id=self._invoker_id, model=model, tier=tier,
                                          nbytes=nbytes, updated=now)
                await self._etcd.put(keys.Kind.CHECKPOINT, (self._invoker_id, model), record,
                                     lease=lease)
                self._published[model] = (tier, nbytes)
                log.info("checkpoint %s on %s: %s tier", model, self._invoker_id, tier)
        for model in set(self._published) - set(want):
            await self._etcd.delete(keys.Kind.CHECKPOINT, (self._invoker_id, model))
            del self._published[model]
