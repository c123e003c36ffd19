"""The DRAM tier's pool: allocation, LRU eviction, leases, concurrency."""

from __future__ import annotations

import threading

import pytest

from store.dram_pool import ALIGNMENT, DramPool

U = ALIGNMENT


def fill(pool: DramPool, key: str, units: int, value: int) -> object:
    lease = pool.reserve(key, units * U, label=key)
    assert lease is not None
    lease.buffer.fill_(value)
    lease.commit()
    return lease


def test_worked_example() -> None:
    """The module docstring's example."""
    pool = DramPool(10 * U, pin=False)
    fill(pool, "A", 4, 1).release()  # type: ignore[attr-defined]
    fill(pool, "B", 4, 2).release()  # type: ignore[attr-defined]
    c = fill(pool, "C", 4, 3)
    assert [e.key for e in pool.entries()] == ["B", "C"]
    assert pool.reserve("D", 8 * U) is None
    assert [e.key for e in pool.entries()] == ["C"]
    c.release()  # type: ignore[attr-defined]
    d = pool.reserve("D", 8 * U)
    assert d is not None and [e.key for e in pool.entries()] == []
    assert d.buffer.data_ptr() == pool.arena.data_ptr()


def test_blocks_are_aligned_and_distinct() -> None:
    pool = DramPool(16 * U, pin=False)
    a = pool.reserve("a", 100)
    b = pool.reserve("b", 5000)
    assert a is not None and b is not None
    assert a.buffer.data_ptr() % U == 0 and b.buffer.data_ptr() % U == 0
    assert a.buffer.numel() == 100 and b.buffer.numel() == 5000
    assert b.buffer.data_ptr() >= a.buffer.data_ptr() + U


def test_lookup_hits_only_committed_entries_and_refreshes_lru() -> None:
    pool = DramPool(8 * U, pin=False)
    fill(pool, "a", 4, 7).release()  # type: ignore[attr-defined]
    fill(pool, "b", 4, 8).release()  # type: ignore[attr-defined]
    hit = pool.lookup("a")
    assert hit is not None and int(hit.buffer[0]) == 7
    hit.release()
    assert pool.lookup("zzz") is None
    fill(pool, "c", 4, 9).release()  # evicts b, the least recently used now
    assert {e.key for e in pool.entries()} == {"a", "c"}


def test_entries_in_use_are_never_evicted() -> None:
    pool = DramPool(8 * U, pin=False)
    a = fill(pool, "a", 8, 1)
    assert pool.reserve("b", 4 * U) is None
    assert int(pool.lookup("a").buffer[-1]) == 1  # type: ignore[union-attr]
    a.release()  # type: ignore[attr-defined]


def test_abort_frees_the_block() -> None:
    pool = DramPool(4 * U, pin=False)
    lease = pool.reserve("a", 4 * U)
    assert lease is not None
    lease.abort()
    assert pool.lookup("a") is None and pool.used_bytes == 0
    assert pool.reserve("b", 4 * U) is not None


def test_too_big_or_zero_budget_does_not_fit() -> None:
    assert DramPool(4 * U, pin=False).reserve("a", 5 * U) is None
    assert DramPool(0, pin=False).reserve("a", 1) is None


def test_reserving_an_existing_key_is_refused() -> None:
    pool = DramPool(4 * U, pin=False)
    fill(pool, "a", 1, 1)
    with pytest.raises(ValueError):
        pool.reserve("a", U)


def test_lookup_waits_for_a_read_in_progress() -> None:
    pool = DramPool(4 * U, pin=False)
    lease = pool.reserve("a", U)
    assert lease is not None
    got: list[int] = []

    def reader() -> None:
        hit = pool.lookup("a")
        assert hit is not None
        got.append(int(hit.buffer[0]))

    t = threading.Thread(target=reader)
    t.start()
    t.join(0.2)
    assert t.is_alive()  # still waiting for the commit
    lease.buffer.fill_(42)
    lease.commit()
    t.join(5)
    assert got == [42]


def test_acquire_is_a_hit_a_new_block_or_nothing() -> None:
    pool = DramPool(4 * U, pin=False)
    lease, hit = pool.acquire("a", 2 * U)
    assert lease is not None and not hit
    lease.commit()
    again, hit = pool.acquire("a", 2 * U)
    assert again is not None and hit and again.buffer.data_ptr() == lease.buffer.data_ptr()
    none, hit = pool.acquire("b", 3 * U)  # "a" is in use: no room
    assert none is None and not hit
