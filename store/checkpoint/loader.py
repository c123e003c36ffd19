"""Load a checkpoint into one buffer and hand out every tensor as a view of it.

Loading (ServerlessLLM, OSDI'24 §4: a loading-optimized format read by a multi-tier loader):

1. **Where the bytes come from.** With a :class:`~store.dram_pool.DramPool`, a checkpoint that is
   already cached is a DRAM-tier hit: nothing is read. Otherwise it is an SSD-tier load, read
   into a block reserved in the pool (it is then cached for the next load) or, without a pool or
   when the pool cannot fit it, into a private buffer.
2. **Reading.** Every data file is split at its checksum-chunk boundaries into read requests of
   at most ``chunk_bytes``, all submitted at once to the native reader's thread pool
   (:mod:`native_loader`: O_DIRECT, 4 KiB-aligned destination). The consumer waits for the chunks
   in order and verifies each one's xxh3-64 checksum while later chunks are still being read.
3. **Device.** On ``cpu`` the tensors are strided views of the host buffer (no per-tensor
   allocation, no copy; a DRAM-tier hit is therefore zero-copy). On ``cuda:N`` the buffer is one
   device allocation: each verified chunk is copied host-to-device asynchronously on a side
   stream while the next chunks are read, from the pool block (page-locked) or, without a pool,
   through a ring of page-locked staging chunks.

Tensors that shared a storage when written share memory again.

One module: the three steps run interleaved, chunk by chunk (a chunk is verified and copied to
the device while the next ones are read), so they share one buffer's life.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from pydantic import ValidationError

from native_loader import DEFAULT_CHUNK_BYTES, Reader, ReadError, buffer_address, default_reader
from sllm.errors import CheckpointError
from sllm.tiers import LocalTier
from store.checkpoint.format import (
    ALIGNMENT,
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointIndex,
    DataFile,
    TensorEntry,
    align_up,
    torch_dtype,
)
from store.dram_pool import DramPool, Lease

STAGING_SLOTS = 4
"""Page-locked staging chunks in flight on the CUDA path without a pool."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint in memory.

    Attributes:
        tensors: name -> view over ``buffer`` (shape, stride and bytes as written).
        buffer: one uint8 tensor holding all data files back to back (file ``i`` at
            ``file_offsets(index)[i]``); it is what keeps the tensors' memory alive.
        nbytes: bytes read from disk.
        seconds: wall time of the read and the checksum pass.
        config: the contents of ``config.json`` (``{}`` when the checkpoint has none).
        index: the checkpoint's index (its ``meta`` has source and dtype).
        tier: where the bytes came from: ``"dram"`` (the pool) or ``"ssd"`` (the data files).
        lease: the pool entry the tensors live in (CPU loads through a pool); held until
            :meth:`release`, so the entry is not evicted while an instance uses it.
    """

    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor
    nbytes: int
    seconds: float
    config: dict[str, Any]
    index: CheckpointIndex | None = None
    tier: LocalTier = "ssd"
    lease: Lease | None = None

    def release(self) -> None:
        """Give back the pool entry the tensors live in (call when the instance is unloaded;
        the tensors must not be used afterwards). Idempotent; a no-op without a pool."""
        if self.lease is not None:
            self.lease.release()


def read_index(path: Path) -> CheckpointIndex:
    """Parse and validate ``<path>/index.json``.

    Raises:
        CheckpointError: the index is missing, unreadable, not JSON, or inconsistent (an entry
            pointing outside its file, wrong checksum count, ...); the message names the file.
    """
    folder = Path(path)
    return _parse_index(folder, _read_index_bytes(folder))


def file_offsets(index: CheckpointIndex) -> list[int]:
    """The offset of each data file within the load buffer (each aligned to ALIGNMENT)."""
    offsets, at = [], 0
    for f in index.files:
        offsets.append(at)
        at = align_up(at + f.size)
    return offsets


def load_checkpoint(
    path: Path,
    *,
    device: str = "cpu",
    verify: bool = True,
    pool: DramPool | None = None,
    reader: Reader | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LoadedCheckpoint:
    """Read a checkpoint folder into memory (see the module docstring for the tiers and the
    pipeline).

    Args:
        path: the checkpoint folder.
        device: ``"cpu"`` or ``"cuda:N"``.
        verify: check every chunk's xxh3-64 checksum as it arrives (sizes are checked either way;
            a DRAM-tier hit was verified when it was read).
        pool: the DRAM tier to load from and cache into; None reads from the files every time.
        reader: the I/O engine (default: a new :func:`native_loader.default_reader`).
        chunk_bytes: bytes per read request.

    Returns:
        The tensors as views of one buffer; ``seconds`` is the wall time until they are usable
        (read, verified and, on CUDA, copied), ``nbytes`` the bytes read from files (0 on a
        DRAM-tier hit), ``tier`` where they came from.

    Raises:
        CheckpointError: the index or a data file is missing or unreadable; a data file is shorter
            or longer than the index says; a checksum differs (the message names the file, chunk
            and byte range); ``config.json`` is not JSON.
    """
    folder = Path(path)
    index_bytes = _read_index_bytes(folder)
    index = _parse_index(folder, index_bytes)
    config = _read_config(folder)
    offsets = file_offsets(index)
    total = align_up(offsets[-1] + index.files[-1].size) if index.files else 0
    _check_sizes(folder, index)
    dev = torch.device(device)
    key = f"{folder.resolve()}@{xxhash.xxh3_64_hexdigest(index_bytes)}"
    label = str(index.meta.get("name") or folder.name)

    start = time.perf_counter()
    lease, hit = pool.acquire(key, total, label=label) if pool is not None else (None, False)
    tier: LocalTier = "dram" if hit else "ssd"
    nbytes = 0
    own_reader = reader is None
    io = reader
    try:
        if io is None and not hit:
            io = default_reader()
        src = _Source(folder, index, offsets, io, verify, chunk_bytes)
        if dev.type == "cuda":
            buffer, nbytes = _load_to_cuda(src, dev, total, lease, hit)
        else:
            buffer = lease.buffer if lease is not None else _aligned_buffer(total)
            if not hit:
                nbytes = _read_verified(src, buffer)
    except BaseException:
        if lease is not None:
            (lease.abort if tier == "ssd" else lease.release)()
        raise
    finally:
        if own_reader and io is not None:
            io.close()
    if lease is not None and tier == "ssd":
        lease.commit()
    if lease is not None and dev.type == "cuda":
        lease.release()  # the device holds its own copy; the entry stays cached
        lease = None
    seconds = time.perf_counter() - start

    tensors = {
        name: _view(buffer, offsets[e.file] + e.offset, e) for name, e in index.tensors.items()
    }
    return LoadedCheckpoint(
        tensors=tensors, buffer=buffer, nbytes=nbytes, seconds=seconds, config=config,
        index=index, tier=tier, lease=lease,
    )


def _read_index_bytes(folder: Path) -> bytes:
    file = folder / INDEX_NAME
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing checkpoint index") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read the checkpoint index: {e}") from e


def _parse_index(folder: Path, data: bytes) -> CheckpointIndex:
    file = folder / INDEX_NAME
    try:
        return CheckpointIndex.model_validate_json(data)
    except ValidationError as e:
        raise CheckpointError(f"{file}: invalid checkpoint index: {e}") from e


@dataclass(frozen=True)
class _Chunk:
    """One checksum chunk of a data file: bytes [lo, hi) of ``file``, at ``at`` in the buffer."""

    file: DataFile
    index: int
    lo: int
    hi: int
    at: int


def _chunks(index: CheckpointIndex, offsets: list[int]) -> list[_Chunk]:
    out = []
    for f, base in zip(index.files, offsets, strict=True):
        for i in range(len(f.checksums)):
            lo = i * f.chunk_bytes
            hi = min(f.size, lo + f.chunk_bytes)
            out.append(_Chunk(f, i, lo, hi, base + lo))
    return out


@dataclass(frozen=True)
class _Source:
    """What to read and how: the checkpoint's files, their places in the buffer, the reader."""

    folder: Path
    index: CheckpointIndex
    offsets: list[int]
    io: Reader | None
    verify: bool
    chunk_bytes: int


def _load_to_cuda(
    src: _Source, dev: torch.device, total: int, lease: Lease | None, hit: bool
) -> tuple[torch.Tensor, int]:
    """One device buffer filled by asynchronous copies on a side stream: from the pool entry
    (a hit), from the pool block chunk by chunk as it is read (a miss with a block), or through
    the staging ring (no block). Returns the buffer and the bytes read from files."""
    buffer = torch.empty(total, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    copy = _device_copier(buffer, stream)
    nbytes = 0
    if hit:
        assert lease is not None
        copy(0, lease.buffer)
    elif lease is not None:
        host = lease.buffer
        nbytes = _read_verified(src, host, on_chunk=lambda at, n: copy(at, host[at : at + n]))
    else:
        nbytes = _read_staged(src, buffer, stream)
    stream.synchronize()
    return buffer, nbytes


def _read_verified(
    src: _Source, host: torch.Tensor, on_chunk: Callable[[int, int], None] | None = None
) -> int:
    """Read every data file into ``host`` (all requests in flight at once), verifying each
    checksum chunk as soon as its reads are done, then handing it to ``on_chunk(at, nbytes)``."""
    folder, index, offsets, io, verify, chunk_bytes = (
        src.folder, src.index, src.offsets, src.io, src.verify, src.chunk_bytes)
    assert io is not None
    base, _ = buffer_address(host)
    chunks = _chunks(index, offsets)
    tickets: list[list[int]] = []
    for c in chunks:
        path = str(folder / c.file.name)
        tickets.append([io.submit(path, lo, min(chunk_bytes, c.hi - lo), base + c.at + lo - c.lo)
                        for lo in range(c.lo, c.hi, chunk_bytes)])
    total = 0
    error: BaseException | None = None
    view = memoryview(host.numpy()) if verify else None
    for c, ts in zip(chunks, tickets, strict=True):
        for t in ts:  # wait for every request, even after an error: the memory must stay ours
            try:
                total += io.wait(t)
            except ReadError as e:
                error = error or CheckpointError(f"{folder}: {e}")
        if error is not None:
            continue
        try:
            if view is not None:
                _check(folder, c, view[c.at : c.at + c.hi - c.lo])
            if on_chunk is not None:
                on_chunk(c.at, c.hi - c.lo)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the reads in flight
            error = e
    if error is not None:
        raise error
    return total


def _read_staged(src: _Source, dest: torch.Tensor, stream: torch.cuda.Stream | None) -> int:
    """Read into ``dest`` (any device) through a ring of :data:`STAGING_SLOTS` page-locked
    staging chunks: chunk j is read into slot j % K, verified, and copied asynchronously; a slot
    is reused once its copy has finished, so reads, checks and copies overlap."""
    folder, index, offsets, io, verify, chunk_bytes = (
        src.folder, src.index, src.offsets, src.io, src.verify, src.chunk_bytes)
    assert io is not None
    chunks = _chunks(index, offsets)
    if not chunks:
        return 0
    slot_bytes = align_up(max(c.hi - c.lo for c in chunks))
    pin = dest.device.type == "cuda"
    slots = [_aligned_buffer(slot_bytes, pin=pin) for _ in range(min(STAGING_SLOTS, len(chunks)))]
    events: list[Any] = [None] * len(slots)
    copy = _device_copier(dest, stream)
    pending: dict[int, list[int]] = {}

    def submit(j: int) -> None:
        c, k = chunks[j], j % len(slots)
        if events[k] is not None:
            events[k].synchronize()  # the slot's previous copy must be done before reuse
        base, _ = buffer_address(slots[k])
        path = str(folder / c.file.name)
        pending[j] = [io.submit(path, lo, min(chunk_bytes, c.hi - lo), base + lo - c.lo)
                      for lo in range(c.lo, c.hi, chunk_bytes)]

    total = 0
    error: BaseException | None = None
    for j in range(len(slots)):
        submit(j)
    for j, c in enumerate(chunks):
        k = j % len(slots)
        for t in pending.pop(j):
            try:
                total += io.wait(t)
            except ReadError as e:
                error = error or CheckpointError(f"{folder}: {e}")
        if error is None:
            n = c.hi - c.lo
            try:
                if verify:
                    _check(folder, c, memoryview(slots[k].numpy())[:n])
                events[k] = copy(c.at, slots[k][:n])
            except BaseException as e:  # noqa: BLE001 - re-raised below, after draining
                error = e
        if error is not None:
            for rest in pending.values():  # drain what is in flight, then fail
                for t in rest:
                    with contextlib.suppress(ReadError):
                        io.wait(t)
            raise error
        if j + len(slots) < len(chunks):
            submit(j + len(slots))
    if stream is not None:
        stream.synchronize()  # the staging slots are freed on return: their copies must be done
    return total


def _device_copier(dest: torch.Tensor, stream: torch.cuda.Stream | None) -> Callable[[int, torch.Tensor], Any]:
    """``copy(at, src)`` copies ``src`` into ``dest[at:]``: asynchronously on ``stream`` for a
    CUDA destination (returns an event that completes with the copy), synchronously otherwise
    (returns None)."""
    def copy(at: int, src: torch.Tensor) -> Any:
        if dest.device.type != "cuda":
            dest[at : at + src.numel()].copy_(src)
            return None
        with torch.cuda.stream(stream):
            dest[at : at + src.numel()].copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event
    return copy


def verify_data_file(folder: Path, file: DataFile) -> None:
    """Check ``<folder>/<file.name>`` against its index entry ``file``: its size, then every
    chunk's xxh3-64 checksum, read with plain buffered I/O one checksum chunk at a time (memory:
    one chunk, ``file.chunk_bytes`` bytes). For files fetched from elsewhere before they are used.

    Raises:
        CheckpointError: the file is missing, unreadable, of another size than the index says, or
            a checksum differs (the message names the file, chunk and byte range).
    """
    path = Path(folder) / file.name
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)  # the end: the file's size
            f.seek(0)
            if size != file.size:
                raise CheckpointError(f"{path}: {size} bytes, the index says {file.size}")
            buf = memoryview(bytearray(min(file.chunk_bytes, file.size)))
            for i, lo in enumerate(range(0, file.size, file.chunk_bytes)):
                c = _Chunk(file, i, lo, min(file.size, lo + file.chunk_bytes), lo)
                n = f.readinto(buf[: c.hi - c.lo])
                if n != c.hi - c.lo:
                    raise CheckpointError(f"{path}: truncated while reading chunk {c.index}")
                _check(Path(folder), c, buf[:n])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing data file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read data file: {e}") from e


def _check(folder: Path, c: _Chunk, data: memoryview) -> None:
    if xxhash.xxh3_64_hexdigest(data) != c.file.checksums[c.index]:
        raise CheckpointError(
            f"{folder / c.file.name}: checksum mismatch in chunk {c.index} "
            f"(bytes {c.lo}..{c.hi}): the file is corrupt"
        )


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    if not file.exists():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read the model config: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: the model config is not a JSON object")
    return config


def _check_sizes(folder: Path, index: CheckpointIndex) -> None:
    """Fail early, before allocating, on a missing, truncated or overlong data file."""
    for f in index.files:
        file = folder / f.name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing data file") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot stat data file: {e}") from e
        if size < f.size:
            raise CheckpointError(f"{file}: truncated: {size} bytes, index says {f.size}")
        if size > f.size:
            raise CheckpointError(f"{file}: {size} bytes, longer than the {f.size} the index says")


def _aligned_buffer(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte is ALIGNMENT-aligned (for direct I/O),
    page-locked when ``pin``."""
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, pin_memory=pin)
    pad = -raw.data_ptr() % ALIGNMENT
    return raw[pad : pad + nbytes]


def _view(buffer: torch.Tensor, at: int, e: TensorEntry) -> torch.Tensor:
    """The tensor of entry ``e`` whose first element is at byte ``at`` of ``buffer``."""
    typed = buffer[at : at + e.nbytes].view(torch_dtype(e.dtype))
    return typed.as_strided(e.shape, e.stride)
