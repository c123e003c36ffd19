"""Write tensors as a loading-optimized checkpoint (layout in :mod:`store.checkpoint.format`).

Tensors are grouped by the torch storage they view; each group's byte span (from the lowest to the
highest byte any of its views touches) is written once at an ALIGNMENT-aligned offset, so tied
weights and views of one another stay shared after loading. Checksums are computed while writing,
so nothing is read back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from store.checkpoint.format import (
    CONFIG_NAME,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_FILE_BYTES,
    INDEX_NAME,
    CheckpointIndex,
    DataFile,
    TensorEntry,
    align_up,
    data_file_name,
    dtype_name,
    span_elements,
)

_SPAN_ALIGN = 64
"""A group's span starts at a multiple of this within its storage, so every view's first element
lands at a multiple of its item size whatever mix of dtypes views the storage."""
_WRITE_PIECE = 64 << 20


@dataclass
class _Group:
    """The views of one storage and the byte range ``[lo, hi)`` of it they touch."""

    storage: torch.UntypedStorage
    names: list[str] = field(default_factory=list)
    lo: int = 0
    hi: int = 0


def _first_byte(t: torch.Tensor) -> int:
    return t.storage_offset() * t.element_size()


def _span_bytes(t: torch.Tensor) -> int:
    return span_elements(tuple(t.shape), t.stride()) * t.element_size()


def _prepare(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` checked for storability, with lazy conj/neg bits resolved (those copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: a tensor on the meta device has no data to store")
    if t.layout != torch.strided or t.is_quantized:
        raise ValueError(f"{name}: only dense strided tensors can be stored, not {t.layout}")
    dtype_name(t.dtype)  # raises ValueError for unstorable dtypes
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.detach()


def _group(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[list[_Group], list[str], dict[str, torch.Tensor]]:
    """Tensors by storage, in first-seen order; the names of tensors with no elements; and every
    tensor checked by :func:`_prepare`."""
    groups: dict[tuple[str, int], _Group] = {}
    empty: list[str] = []
    prepared: dict[str, torch.Tensor] = {}
    for name, raw in tensors.items():
        t = _prepare(name, raw)
        prepared[name] = t
        if t.numel() == 0:
            empty.append(name)
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        lo, hi = _first_byte(t), _first_byte(t) + _span_bytes(t)
        g = groups.get(key)
        if g is None:
            groups[key] = _Group(storage, [name], lo, hi)
        else:
            g.names.append(name)
            g.lo, g.hi = min(g.lo, lo), max(g.hi, hi)
    for g in groups.values():
        g.lo -= g.lo % _SPAN_ALIGN
    return list(groups.values()), empty, prepared


class _DataFileWriter:
    """Appends bytes to one data file, hashing each chunk as it goes."""

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.size = 0
        self.checksums: list[str] = []
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self._hash = xxhash.xxh3_64()
        self._in_chunk = 0

    def write(self, data: memoryview) -> None:
        """Append ``data`` (bytes)."""
        self._f.write(data)
        self.size += len(data)
        while len(data):
            take = min(len(data), self.chunk_bytes - self._in_chunk)
            self._hash.update(data[:take])
            self._in_chunk += take
            data = data[take:]
            if self._in_chunk == self.chunk_bytes:
                self._end_chunk()

    def pad_to(self, size: int) -> None:
        """Append zeros up to ``size`` bytes."""
        if size > self.size:
            self.write(memoryview(bytes(size - self.size)))

    def finish(self) -> DataFile:
        """Pad to ALIGNMENT, flush to disk, close, and describe the file."""
        self.pad_to(align_up(self.size))
        if self._in_chunk:
            self._end_chunk()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return DataFile(
            name=self.path.name, size=self.size, chunk_bytes=self.chunk_bytes,
            checksums=self.checksums,
        )

    def close(self) -> None:
        """Close without finishing (on an error)."""
        self._f.close()

    def _end_chunk(self) -> None:
        self.checksums.append(self._hash.hexdigest())
        self._hash.reset()
        self._in_chunk = 0


def _write_span(out: _DataFileWriter, g: _Group) -> None:
    """Append storage bytes ``[g.lo, g.hi)`` in pieces (CUDA spans are copied piece by piece)."""
    as_bytes = torch.empty(0, dtype=torch.uint8, device=g.storage.device).set_(g.storage)
    for start in range(g.lo, g.hi, _WRITE_PIECE):
        piece = as_bytes[start : min(g.hi, start + _WRITE_PIECE)].cpu()
        out.write(memoryview(piece.numpy()))


def _default_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    """The dtype holding the most bytes (what a model is "in")."""
    by_bytes: Counter[str] = Counter()
    for t in tensors.values():
        by_bytes[dtype_name(t.dtype)] += t.numel() * t.element_size()
    return by_bytes.most_common(1)[0][0] if by_bytes else ""


def write_tensors(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    meta: Mapping[str, Any] | None = None,
    file_bytes: int = DEFAULT_FILE_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CheckpointIndex:
    """Write data files and ``index.json`` into an existing folder (not atomic by itself: write
    into a staging folder, as :func:`write_checkpoint` and the model store do).

    Args:
        folder: an existing folder without an index.
        tensors: name -> tensor (CPU or CUDA, any dtype in ``format.DTYPES``); views of one storage
            are stored once and stay views of one another after loading.
        meta: free-form JSON-able facts for ``index.meta``; ``created`` (unix s) and ``dtype`` (the
            dtype holding the most bytes) are filled in when absent.
        file_bytes: target bytes per data file; a storage span larger than it gets its own file.
        chunk_bytes: bytes per checksum.

    Returns:
        The index that was written.

    Raises:
        ValueError: a tensor is sparse, quantized, on the meta device or of an unstorable dtype;
            ``file_bytes`` or ``chunk_bytes`` is not positive.
        FileExistsError: ``folder`` already holds an index.
    """
    if file_bytes <= 0 or chunk_bytes <= 0:
        raise ValueError("file_bytes and chunk_bytes must be positive")
    if (folder / INDEX_NAME).exists():
        raise FileExistsError(f"{folder} already holds a checkpoint")
    groups, empty, prepared = _group(tensors)
    entries: dict[str, TensorEntry] = {}
    placed: dict[str, tuple[int, int]] = {name: (0, 0) for name in empty}  # name -> file, offset
    files: list[DataFile] = []
    out = _DataFileWriter(folder / data_file_name(0), chunk_bytes)
    try:
        for g in groups:
            start = align_up(out.size)
            if out.size and start + (g.hi - g.lo) > file_bytes:
                files.append(out.finish())
                out = _DataFileWriter(folder / data_file_name(len(files)), chunk_bytes)
                start = 0
            out.pad_to(start)
            _write_span(out, g)
            for name in g.names:
                placed[name] = (len(files), start + _first_byte(prepared[name]) - g.lo)
        files.append(out.finish())
    except BaseException:
        out.close()
        raise
    for name, t in prepared.items():
        file, offset = placed[name]
        entries[name] = TensorEntry(
            file=file, offset=offset, nbytes=_span_bytes(t), shape=list(t.shape),
            stride=list(t.stride()), dtype=dtype_name(t.dtype),
        )
    full_meta = {"created": time.time(), "dtype": _default_dtype(prepared), **(meta or {})}
    index = CheckpointIndex(
        files=files, tensors=entries, total_bytes=sum(f.size for f in files), meta=full_meta
    )
    _write_json(folder / INDEX_NAME, index.model_dump(mode="json"))
    return index


def write_config(folder: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` into ``folder``, without ``quantization_config`` (the weights stored
    here are dequantized)."""
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    _write_json(folder / CONFIG_NAME, clean)


def write_checkpoint(
    dest: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    config: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    file_bytes: int = DEFAULT_FILE_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CheckpointIndex:
    """Write a whole checkpoint folder at ``dest`` atomically: into a temp folder beside it, then
    renamed, so ``dest`` never holds half a checkpoint.

    Args:
        dest: the folder to create; must not exist.
        tensors, meta, file_bytes, chunk_bytes: as for :func:`write_tensors`.
        config: the model config for ``config.json`` (``{}`` when None).

    Returns:
        The index that was written.

    Raises:
        FileExistsError: ``dest`` exists.
        ValueError: as for :func:`write_tensors`.
    """
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        index = write_tensors(
            tmp, tensors, meta=meta, file_bytes=file_bytes, chunk_bytes=chunk_bytes
        )
        write_config(tmp, config or {})
        fsync_dir(tmp)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new files, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
