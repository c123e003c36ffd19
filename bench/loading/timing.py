"""Timing one load until its weights are usable, and giving them back after.

A load is timed from calling the loader until every weight is in memory and usable. Some
loaders map the file and read it only when a page is first touched (``safetensors`` on CPU,
``from_pretrained``), so on CPU every load, sllm's included, ends with :func:`touch`; that pass
is inside the timed region and kept apart as the row's ``touches``. On a GPU the load ends with
``torch.cuda.synchronize()`` instead (device memory is never mapped lazily) and touches 0 s.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bench.loading.row import Row
from bench.pagecache import drop_caches

PAGE = 4096
"""Bytes between the bytes :func:`touch` reads (the kernel's page size)."""


@dataclass
class Loaded:
    """What a loader returned: its tensors, where they came from, and how to give them back."""

    tensors: list[torch.Tensor]
    tier: str | None = None  # the tier sllm's loader reports; None for the peers
    keep: Any = None  # what must stay alive while the tensors are used
    release: Callable[[], None] = lambda: None


def touch(tensors: Iterable[torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every tensor (and its last byte), each storage range
    once: what it takes to make a lazily mapped tensor resident. Returns a checksum of the bytes,
    so the reads cannot be skipped."""
    acc = 0
    seen: set[tuple[int, int]] = set()
    for t in tensors:
        if t.numel() == 0 or (t.data_ptr(), t.nbytes) in seen:
            continue
        seen.add((t.data_ptr(), t.nbytes))
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        raw = flat.view(torch.uint8)
        acc += int(raw[::PAGE].sum()) + int(raw[-1])
    return acc


def timed(load: Callable[[], Loaded], device: str = "cpu") -> tuple[float, float, Loaded]:
    """(seconds until usable, of which touching, the loaded result). On a GPU the load is
    usable once the device has finished every copy: no touching, a synchronize."""
    t0 = time.perf_counter()
    out = load()
    t1 = time.perf_counter()
    if device == "cpu":
        touch(out.tensors)
    else:
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    return t2 - t0, (t2 - t1 if device == "cpu" else 0.0), out


def time_once(row: Row, load: Callable[[], Loaded], cache: str) -> str | None:
    """One timed load added to ``row`` (the page cache dropped first for a cold row); the loaded
    data is freed again. Returns the tier the loader reported."""
    if cache == "cold":
        drop_caches()
    secs, touched, out = timed(load, row.device)
    row.runs.append(secs)
    row.touches.append(touched)
    tier = out.tier
    free(out)
    return tier


def free(out: Loaded | None) -> None:
    """Give ``out`` back (its ``release``), collect garbage, and empty torch's CUDA cache."""
    if out is not None:
        out.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
