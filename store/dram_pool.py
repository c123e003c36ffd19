"""The DRAM tier: a memory-budgeted pool in every invoker that caches recently loaded checkpoints.

ServerlessLLM (OSDI'24, §4.2) keeps a pre-allocated, page-locked chunk pool in host memory between
the SSD and the GPU; the pool doubles as a cache of recently used checkpoints, evicted least
recently used. Here the pool is one arena allocated once at invoker start-up and pre-faulted (its
pages written once, so no load ever pays the kernel's first-touch page faults), page-locked when
CUDA is present so host-to-device copies are asynchronous.

A checkpoint occupies one contiguous, 4 KiB-aligned block of the arena (direct I/O reads straight
into it). Blocks are handed out first-fit; when none fits, unused entries are evicted least
recently used until one does. An entry in use (its tensors back a loaded instance, or a load is
copying from it) is never evicted. A checkpoint that cannot fit even after evicting every unused
entry is loaded outside the pool and not cached.

Worked example (the test ``test_worked_example``; one unit is 4 KiB): budget 10 units; A (4
units) sits at [0, 4) and B (4) at [4, 8), both unused, A used less recently; [8, 10) is free.
C (4) does not fit in the 2 free units, so A is evicted and C takes [0, 4). D (8) arrives while C
is in use: B is evicted, which leaves [4, 10), 6 contiguous units, and nothing else may go, so D
is loaded outside the pool. Once C is released, D (8) fits after evicting C and takes [0, 8).

Lifecycle of an entry: :meth:`DramPool.reserve` (a block for a new entry, while the caller reads
into it) -> :meth:`Lease.commit` (now a cached entry others can find) or :meth:`Lease.abort`
(the block is freed); :meth:`DramPool.lookup` hands out a further lease of a cached entry; every
lease is given back with :meth:`Lease.release`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ALIGNMENT = 4096
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _advise_huge_pages(buf: torch.Tensor) -> bool:
    """``madvise(MADV_HUGEPAGE)`` on a 2 MiB-aligned buffer; False where the OS refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(buf.data_ptr(), buf.numel(), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def _align_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _block_bytes(nbytes: int) -> int:
    """The arena bytes a block for ``nbytes`` takes: at least one 4 KiB unit, whole units."""
    return _align_up(max(nbytes, 1))


@dataclass
class _Entry:
    key: str
    label: str  # what the entry holds, for humans and etcd (the model name)
    start: int  # byte offset in the arena
    nbytes: int
    refs: int = 0
    committed: bool = False
    last_used: float = 0.0

    @property
    def span(self) -> int:
        """Arena bytes the entry's block takes."""
        return _block_bytes(self.nbytes)


@dataclass(frozen=True)
class EntryInfo:
    """A cached checkpoint: its key, label, size (bytes), leases held, last use (unix s)."""

    key: str
    label: str
    nbytes: int
    refs: int
    last_used: float


class Lease:
    """A hold on one pool entry; its ``buffer`` (uint8, ``nbytes`` long, 4 KiB-aligned) is valid
    until :meth:`release` (or :meth:`abort`)."""

    def __init__(self, pool: DramPool, entry: _Entry) -> None:
        self._pool = pool
        self._entry = entry
        self.buffer: torch.Tensor = pool.arena[entry.start : entry.start + entry.nbytes]
        self._done = False

    @property
    def key(self) -> str:
        return self._entry.key

    def commit(self) -> None:
        """Publish a reserved entry whose buffer now holds the checkpoint (the lease stays held)."""
        self._pool._commit(self._entry)

    def abort(self) -> None:
        """Drop a reserved entry whose read failed; frees its block."""
        if not self._done:
            self._done = True
            self._pool._abort(self._entry)

    def release(self) -> None:
        """Give the lease back (idempotent); an entry with no lease left may be evicted."""
        if not self._done:
            self._done = True
            self._pool._release(self._entry)


class DramPool:
    """A pre-faulted host-memory arena caching checkpoints, least recently used out.

    Args:
        budget_bytes: arena size (rounded up to 4 KiB); 0 makes a pool that caches nothing.
        pin: page-lock the arena (default: when CUDA is available).
        hugepages: ask the kernel to back the arena with transparent huge pages
            (``madvise(MADV_HUGEPAGE)``): fewer page faults to pre-fault it, and faster direct
            reads into it (docs/architecture.md, Decisions).
        clock: unix seconds, for ``last_used``.

    Thread-safe: loads run in threads.
    """

    def __init__(
        self, budget_bytes: int, *, pin: bool | None = None, hugepages: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = _align_up(budget_bytes)
        self.pinned = torch.cuda.is_available() if pin is None else pin
        t0 = time.perf_counter()
        raw = torch.empty(self.budget + HUGE_PAGE, dtype=torch.uint8, pin_memory=self.pinned)
        pad = -raw.data_ptr() % HUGE_PAGE
        self.arena = raw[pad : pad + self.budget]
        self.huge_pages = hugepages and self.budget > 0 and _advise_huge_pages(self.arena)
        if self.budget:
            self.arena.numpy()[::ALIGNMENT] = 0  # write each page once: fault it in now
        self.prefault_seconds = time.perf_counter() - t0
        self._clock = clock
        self._lock = threading.Condition()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._free: list[tuple[int, int]] = [(0, self.budget)] if self.budget else []
        log.info("DRAM pool: %d bytes%s%s, pre-faulted in %.2f s", self.budget,
                 " page-locked" if self.pinned else "", " huge pages" if self.huge_pages else "",
                 self.prefault_seconds)

    # --- public ---------------------------------------------------------------------------------

    def lookup(self, key: str) -> Lease | None:
        """A lease on the cached entry ``key``, or None when it is not cached. Waits while
        another thread is still reading that same checkpoint in (then returns its entry)."""
        with self._lock:
            while True:
                e = self._entries.get(key)
                if e is None:
                    return None
                if e.committed:
                    e.refs += 1
                    e.last_used = self._clock()
                    self._entries.move_to_end(key)
                    return Lease(self, e)
                self._lock.wait()

    def acquire(self, key: str, nbytes: int, *, label: str = "") -> tuple[Lease | None, bool]:
        """Look up ``key`` and, on a miss, reserve a block for it, atomically (two loads of the
        same checkpoint never both read it).

        Returns:
            ``(lease, True)``: a DRAM-tier hit (waits while another thread is still reading it);
            ``(lease, False)``: a new block the caller fills, then commits or aborts;
            ``(None, False)``: a miss that cannot fit; load outside the pool.
        """
        with self._lock:
            while key in self._entries and not self._entries[key].committed:
                self._lock.wait()
            hit = self.lookup(key)  # re-entrant: the condition's lock is an RLock
            if hit is not None:
                return hit, True
            return self.reserve(key, nbytes, label=label), False

    def reserve(self, key: str, nbytes: int, *, label: str = "") -> Lease | None:
        """A block of ``nbytes`` for a new entry ``key``, evicting unused entries least recently
        used first; None when it cannot fit (the caller loads outside the pool). The caller
        reads into ``lease.buffer`` and then commits or aborts.

        Raises:
            ValueError: ``key`` is already cached or being read (call :meth:`lookup` first).
        """
        size = _block_bytes(nbytes)
        with self._lock:
            if key in self._entries:
                raise ValueError(f"pool entry {key!r} exists already")
            start = self._fit(size)
            while start is None:
                victim = next((e for e in self._entries.values() if e.refs == 0 and e.committed), None)
                if victim is None:
                    return None
                self._evict(victim)
                start = self._fit(size)
            e = _Entry(key=key, label=label, start=start, nbytes=nbytes, refs=1,
                       last_used=self._clock())
            self._entries[key] = e
            return Lease(self, e)

    def entries(self) -> list[EntryInfo]:
        """The cached (committed) entries, least recently used first."""
        with self._lock:
            return [EntryInfo(e.key, e.label, e.nbytes, e.refs, e.last_used)
                    for e in self._entries.values() if e.committed]

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.span for e in self._entries.values())

    # --- internals (lock held by callers below) ---------------------------------------------------

    def _fit(self, size: int) -> int | None:
        for i, (lo, hi) in enumerate(self._free):
            if hi - lo >= size:
                self._free[i] = (lo + size, hi)
                if lo + size == hi:
                    del self._free[i]
                return lo
        return None

    def _give_back(self, start: int, size: int) -> None:
        self._free.append((start, start + size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in self._free:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self._free = merged

    def _evict(self, e: _Entry) -> None:
        del self._entries[e.key]
        self._give_back(e.start, e.span)
        log.info("DRAM pool: evicted %s (%d bytes)", e.label or e.key, e.nbytes)

    def _commit(self, e: _Entry) -> None:
        with self._lock:
            e.committed = True
            e.last_used = self._clock()
            self._lock.notify_all()

    def _abort(self, e: _Entry) -> None:
        with self._lock:
            if self._entries.get(e.key) is e:
                del self._entries[e.key]
                self._give_back(e.start, e.span)
            self._lock.notify_all()

    def _release(self, e: _Entry) -> None:
        with self._lock:
            e.refs = max(0, e.refs - 1)
            e.last_used = self._clock()
