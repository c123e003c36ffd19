"""sllm's loader rows: ``load_checkpoint`` without a pool, through a ``DramPool`` that does not
hold the checkpoint (SSD tier), and again on that pool (DRAM tier).

The pool lives for the whole measurement, as an invoker's does: allocated and pre-faulted
untimed, sized to the checkpoint's aligned data files, and emptied before each SSD-tier load.
"""

from __future__ import annotations

import gc
from functools import partial

from bench.loading.models import Model
from bench.loading.row import Row
from bench.loading.timing import Loaded, free, time_once, timed
from bench.pagecache import drop_caches
from store.checkpoint import ALIGNMENT, load_checkpoint, read_index
from store.checkpoint.format import align_up
from store.dram_pool import DramPool


def load_native(m: Model, device: str = "cpu", pool: DramPool | None = None) -> Loaded:
    """``load_checkpoint`` of the model's sllm checkpoint onto ``device``, through ``pool``
    when given."""
    ckpt = load_checkpoint(m.sllm_dir, device=device, pool=pool)
    return Loaded(list(ckpt.tensors.values()), ckpt.tier, ckpt, ckpt.release)


def _pool_budget(m: Model) -> int:
    """Bytes of a pool that holds the model's checkpoint: its data files, each aligned."""
    return sum(align_up(f.size) for f in read_index(m.sllm_dir).files) + ALIGNMENT


def _evict(pool: DramPool) -> None:
    """Empty the pool through its public API: reserving all of it evicts every unused entry."""
    lease = pool.reserve("bench.loading: evict", pool.budget)
    if lease is None:
        raise RuntimeError("the DRAM pool could not be emptied: an entry is still in use")
    lease.abort()


def measure_native(m: Model, caches: list[str], repeat: int, device: str = "cpu") -> list[Row]:
    """sllm's loader: without a pool; through the pool when it does not hold the checkpoint
    (SSD tier); again on the pool (DRAM tier).

    The pool lives for the whole measurement, as an invoker's does, and is emptied before each
    SSD-tier load. Its first load, into memory nothing had been read into yet, is not in the rows
    but in their note: on this VM such a read is slower than into memory read into before."""
    rows: list[Row] = []
    free(load_native(m, device))  # untimed: one-time code paths are not loading
    pool = DramPool(_pool_budget(m))  # allocated and pre-faulted outside the timing
    drop_caches()
    first, _, out = timed(partial(load_native, m, device, pool), device)
    free(out)
    del out
    for cache in caches:
        nopool = Row("native_loader-nopool", "ssd", cache, m.name, m.nbytes, device=device)
        ssd = Row("native_loader", "ssd", cache, m.name, m.nbytes, device=device,
                  note=f"first load into a new pool (cold): {first:.3f} s")
        dram = Row("native_loader", "dram", cache, m.name, m.nbytes, device=device)
        rows += [ssd, dram, nopool]
        if cache == "warm":
            free(load_native(m, device))
        for _ in range(repeat):
            time_once(nopool, partial(load_native, m, device), cache)
        for _ in range(repeat):
            _evict(pool)
            for row in (ssd, dram):
                tier = time_once(row, partial(load_native, m, device, pool), cache)
                if tier != row.tier:
                    row.note = f"load_checkpoint reported tier {tier!r}"
    del pool
    gc.collect()
    return rows
