"""Load a checkpoint into one buffer and hand out every tensor as a view of it.

Loading is one allocation (the sum of the data files, each placed at an ALIGNMENT-aligned offset),
one pass of the native reader over the files, a checksum pass, and then a strided view per tensor:
no per-tensor allocation or copy, and tensors that shared a storage when written share memory again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from pydantic import ValidationError

from invoker.checkpoint.format import (
    ALIGNMENT,
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointIndex,
    TensorEntry,
    align_up,
    torch_dtype,
)
from native_loader import read_files
from sllm.errors import CheckpointError


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
    """

    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor
    nbytes: int
    seconds: float
    config: dict[str, Any]
    index: CheckpointIndex | None = None


def read_index(path: Path) -> CheckpointIndex:
    """Parse and validate ``<path>/index.json``.

    Raises:
        CheckpointError: the index is missing, unreadable, not JSON, or inconsistent (an entry
            pointing outside its file, wrong checksum count, ...); the message names the file.
    """
    file = Path(path) / INDEX_NAME
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing checkpoint index") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the checkpoint index: {e}") from e
    try:
        return CheckpointIndex.model_validate_json(text)
    except ValidationError as e:
        raise CheckpointError(f"{file}: invalid checkpoint index: {e}") from e


def file_offsets(index: CheckpointIndex) -> list[int]:
    """The offset of each data file within the load buffer (each aligned to ALIGNMENT)."""
    offsets, at = [], 0
    for f in index.files:
        offsets.append(at)
        at = align_up(at + f.size)
    return offsets


def load_checkpoint(path: Path, *, device: str = "cpu", verify: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint folder into memory.

    Args:
        path: the checkpoint folder.
        device: ``"cpu"``, or ``"cuda:N"`` to copy the buffer to that GPU once and build the views
            there.
        verify: check every chunk's xxh3_64 checksum (sizes are checked either way).

    Returns:
        The tensors as views of one buffer, with timing and the model config.

    Raises:
        CheckpointError: the index or a data file is missing or unreadable; a data file is shorter
            or longer than the index says; a checksum differs (the message names the file, chunk
            and byte range); ``config.json`` is not JSON.
    """
    folder = Path(path)
    index = read_index(folder)
    config = _read_config(folder)
    offsets = file_offsets(index)
    total = align_up(offsets[-1] + index.files[-1].size) if index.files else 0
    _check_sizes(folder, index)

    start = time.perf_counter()
    buffer = _aligned_buffer(total)
    jobs = [
        (str(folder / f.name), off, f.size) for f, off in zip(index.files, offsets, strict=True)
    ]
    try:
        nbytes = read_files(jobs, buffer.numpy())
    except OSError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    if verify:
        _verify(folder, index, offsets, buffer)
    seconds = time.perf_counter() - start

    if device != "cpu":
        buffer = buffer.to(device)
    tensors = {
        name: _view(buffer, offsets[e.file] + e.offset, e) for name, e in index.tensors.items()
    }
    return LoadedCheckpoint(
        tensors=tensors, buffer=buffer, nbytes=nbytes, seconds=seconds, config=config, index=index
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


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte is ALIGNMENT-aligned (for direct I/O)."""
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    pad = -raw.data_ptr() % ALIGNMENT
    return raw[pad : pad + nbytes]


def _verify(folder: Path, index: CheckpointIndex, offsets: list[int], buffer: torch.Tensor) -> None:
    data = memoryview(buffer.numpy())
    for f, base in zip(index.files, offsets, strict=True):
        for i, expected in enumerate(f.checksums):
            lo = i * f.chunk_bytes
            hi = min(f.size, lo + f.chunk_bytes)
            if xxhash.xxh3_64_hexdigest(data[base + lo : base + hi]) != expected:
                raise CheckpointError(
                    f"{folder / f.name}: checksum mismatch in chunk {i} "
                    f"(bytes {lo}..{hi}): the file is corrupt"
                )


def _view(buffer: torch.Tensor, at: int, e: TensorEntry) -> torch.Tensor:
    """The tensor of entry ``e`` whose first element is at byte ``at`` of ``buffer``."""
    typed = buffer[at : at + e.nbytes].view(torch_dtype(e.dtype))
    return typed.as_strided(e.shape, e.stride)
