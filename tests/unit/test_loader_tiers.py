"""Loading through the tiers: SSD into the DRAM pool, DRAM-tier hits, eviction under a budget,
corruption, the staging ring of the CUDA path, and CUDA itself where a GPU is present."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from native_loader import PyReader, default_reader
from sllm.errors import CheckpointError
from store.checkpoint import load_checkpoint, read_index, write_checkpoint
from store.checkpoint.loader import _read_staged, _Source, file_offsets
from store.dram_pool import DramPool

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make(path: Path, seed: int, *, mib: float = 1.0, chunk_bytes: int = 64 << 10) -> dict[str, torch.Tensor]:
    """A checkpoint of about ``mib`` MiB with odd shapes, a tied pair and several checksum chunks."""
    g = torch.Generator().manual_seed(seed)
    n = int(mib * (1 << 20) / 4)
    emb = torch.randn(n // 2 // 97, 97, generator=g)
    tensors = {
        "embed.weight": emb,
        "head.weight": emb,  # tied
        "mlp.weight": torch.randn(n // 2 // 13, 13, generator=g),
        "scale": torch.tensor(3.5),
        "ids": torch.arange(1001, dtype=torch.int64),
        "half": torch.randn(7, 5, generator=g).to(torch.bfloat16),
    }
    write_checkpoint(path, tensors, file_bytes=1 << 19, chunk_bytes=chunk_bytes, meta={"name": path.name})
    return tensors


def same(loaded: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)


def test_second_load_is_a_zero_copy_dram_hit(tmp_path: Path) -> None:
    want = make(tmp_path / "a", 1)
    pool = DramPool(4 << 20, pin=False)
    first = load_checkpoint(tmp_path / "a", pool=pool)
    assert first.tier == "ssd" and first.nbytes > 0 and same(first.tensors, want)
    second = load_checkpoint(tmp_path / "a", pool=pool)
    assert second.tier == "dram" and second.nbytes == 0 and same(second.tensors, want)
    lo, hi = pool.arena.data_ptr(), pool.arena.data_ptr() + pool.budget
    assert all(lo <= t.data_ptr() < hi for t in second.tensors.values() if t.numel())
    assert second.tensors["embed.weight"].data_ptr() == first.tensors["embed.weight"].data_ptr()
    assert second.tensors["head.weight"].data_ptr() == second.tensors["embed.weight"].data_ptr()
    assert [e.label for e in pool.entries()] == ["a"] and pool.entries()[0].refs == 2
    first.release()
    second.release()
    assert pool.entries()[0].refs == 0


def test_entry_in_use_is_not_evicted_and_the_other_loads_outside_the_pool(tmp_path: Path) -> None:
    want_a, want_b = make(tmp_path / "a", 1), make(tmp_path / "b", 2)
    pool = DramPool(int(1.5 * (1 << 20)), pin=False)  # holds one of them, not both
    a = load_checkpoint(tmp_path / "a", pool=pool)
    b = load_checkpoint(tmp_path / "b", pool=pool)
    assert b.tier == "ssd" and b.lease is None and same(b.tensors, want_b)
    assert same(a.tensors, want_a)  # untouched by b's load
    assert [e.label for e in pool.entries()] == ["a"]
    a.release()
    b2 = load_checkpoint(tmp_path / "b", pool=pool)
    assert b2.tier == "ssd" and b2.lease is not None and same(b2.tensors, want_b)
    assert [e.label for e in pool.entries()] == ["b"]
    assert load_checkpoint(tmp_path / "b", pool=pool).tier == "dram"


def test_concurrent_loads_under_a_budget_that_cannot_hold_both(tmp_path: Path) -> None:
    wants = {name: make(tmp_path / name, seed) for seed, name in enumerate(["a", "b"])}
    pool = DramPool(int(1.5 * (1 << 20)), pin=False)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            for _ in range(6):
                ck = load_checkpoint(tmp_path / name, pool=pool)
                assert same(ck.tensors, wants[name]), name
                ck.release()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(pool.entries()) == 1 and pool.entries()[0].refs == 0


def test_concurrent_loads_of_one_checkpoint_read_it_once(tmp_path: Path) -> None:
    want = make(tmp_path / "a", 1, mib=2.0)
    pool = DramPool(4 << 20, pin=False)
    tiers: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            ck = load_checkpoint(tmp_path / "a", pool=pool)
            assert same(ck.tensors, want)
            tiers.append(ck.tier)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(tiers) == ["dram"] * 5 + ["ssd"]
    assert pool.entries()[0].refs == 6


def test_corrupt_chunk_fails_and_leaves_nothing_cached(tmp_path: Path) -> None:
    make(tmp_path / "a", 1)
    data = tmp_path / "a" / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[70000] ^= 0xFF  # inside the second 64 KiB checksum chunk
    data.write_bytes(bytes(raw))
    pool = DramPool(4 << 20, pin=False)
    with pytest.raises(CheckpointError, match=r"data-00000.bin: checksum mismatch in chunk 1"):
        load_checkpoint(tmp_path / "a", pool=pool)
    assert pool.entries() == [] and pool.used_bytes == 0


def test_truncated_file_fails_through_the_pool(tmp_path: Path) -> None:
    make(tmp_path / "a", 1)
    data = tmp_path / "a" / "data-00000.bin"
    data.write_bytes(data.read_bytes()[:-4096])
    pool = DramPool(4 << 20, pin=False)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "a", pool=pool)
    assert pool.used_bytes == 0


def test_replaced_checkpoint_at_the_same_path_is_not_a_stale_hit(tmp_path: Path) -> None:
    make(tmp_path / "a", 1)
    pool = DramPool(4 << 20, pin=False)
    load_checkpoint(tmp_path / "a", pool=pool).release()
    import shutil
    shutil.rmtree(tmp_path / "a")
    want = make(tmp_path / "a", 99)
    again = load_checkpoint(tmp_path / "a", pool=pool)
    assert again.tier == "ssd" and same(again.tensors, want)


@pytest.mark.parametrize("chunk_bytes", [4096, 12288, 1 << 20])
def test_read_requests_split_inside_tensors_and_checksum_chunks(tmp_path: Path, chunk_bytes: int) -> None:
    want = make(tmp_path / "a", 5, chunk_bytes=20480)
    assert same(load_checkpoint(tmp_path / "a", chunk_bytes=chunk_bytes).tensors, want)


@pytest.mark.parametrize("reader", [PyReader, default_reader])
def test_staging_ring_of_the_cuda_path_with_a_cpu_destination(tmp_path: Path, reader: object) -> None:
    """The ring (read into slot j % K, verify, copy, reuse) checked on a CPU destination."""
    make(tmp_path / "a", 3, mib=2.0, chunk_bytes=64 << 10)  # many more chunks than slots
    index = read_index(tmp_path / "a")
    offsets = file_offsets(index)
    direct = load_checkpoint(tmp_path / "a")
    dest = torch.zeros_like(direct.buffer)
    with reader() as io:  # type: ignore[operator]
        n = _read_staged(_Source(tmp_path / "a", index, offsets, io, True, 16 << 10), dest, None)
    assert n == direct.nbytes
    assert torch.equal(dest, direct.buffer)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("with_pool", [False, True])
def test_cuda_load_matches_the_cpu_load(tmp_path: Path, with_pool: bool) -> None:
    want = make(tmp_path / "a", 4, mib=3.0)
    pool = DramPool(8 << 20) if with_pool else None
    for expect_tier in (["ssd", "dram"] if with_pool else ["ssd"]):
        ck = load_checkpoint(tmp_path / "a", device="cuda:0", pool=pool)
        assert ck.tier == expect_tier and ck.buffer.is_cuda
        assert same({k: v.cpu() for k, v in ck.tensors.items()}, want)
        assert ck.tensors["head.weight"].data_ptr() == ck.tensors["embed.weight"].data_ptr()
