"""This machine's limits, measured in the same run as the loaders, one :class:`Row` each with
``loader`` ``limit``:

- tier ``ssd`` (:func:`ssd_limit`): sequential O_DIRECT reads in 4 MiB blocks of the model's own
  sllm data files, by ``fio`` (every variant of :data:`FIO_VARIANTS` once, then the fastest
  until it has ``repeat`` runs; the median), or without fio by a Python O_DIRECT read with 1, 4
  or 16 blocks in flight (:data:`PY_DIRECT_THREADS`), labelled so;
- tier ``dram`` (:func:`dram_limit`): ``numpy.copyto`` between two pre-faulted arrays of the
  model's size, best of 3;
- tier ``h2d`` (:func:`h2d_limit`, on a GPU only): ``Tensor.copy_`` of the model's bytes from
  page-locked host memory to the device, best of 3.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench.loading import neighbours
from bench.loading.models import Model
from bench.loading.row import Row
from bench.loading.timing import free
from bench.pagecache import drop_caches
from store.checkpoint import read_index

BLOCK = 4 << 20
"""Bytes per read of the SSD limit (4 MiB)."""

FIO_VARIANTS = {
    # this machine's virtual disk scales with requests in flight, so deep queues are tried too
    "psync": ["--ioengine=psync"],
    "libaio iodepth=8": ["--ioengine=libaio", "--iodepth=8"],
    "libaio iodepth=32": ["--ioengine=libaio", "--iodepth=32"],
    "libaio iodepth=128": ["--ioengine=libaio", "--iodepth=128"],
    "psync numjobs=4": ["--ioengine=psync", "--numjobs=4", "--group_reporting"],
    # what runai-model-streamer does (io_uring, registered buffers, 64 requests in flight)
    "io_uring iodepth=64 fixedbufs": ["--ioengine=io_uring", "--iodepth=64", "--fixedbufs"],
    "io_uring iodepth=128 fixedbufs": ["--ioengine=io_uring", "--iodepth=128", "--fixedbufs"],
}
"""The fio runs tried, by name: the options each adds to the sequential O_DIRECT read."""


def _fio(files: list[Path], variant: list[str]) -> tuple[int, float]:
    """One fio run over ``files`` (one job per file, stonewalled); (bytes, seconds)."""
    cmd = ["fio", "--output-format=json", "--readonly"]
    jobs = "numjobs=4" in " ".join(variant)
    for i, f in enumerate(files):
        size = f.stat().st_size // BLOCK * BLOCK or f.stat().st_size
        part = size // 4 // BLOCK * BLOCK if jobs else size
        cmd += [f"--name=read{i}", f"--filename={f}", "--rw=read", "--direct=1", "--bs=4M",
                f"--size={part or size}", "--stonewall", *variant]
        if jobs and part:
            cmd.append(f"--offset_increment={part}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    report = json.loads(out[out.index("{"):])
    nbytes = sum(j["read"]["io_bytes"] for j in report["jobs"])
    neighbours.FIO_READ_BYTES[0] += nbytes
    # a group's runtime is its elapsed time; groups ran one after another
    seconds = sum(j["read"]["runtime"] for j in report["jobs"]) / 1000
    return nbytes, seconds


PY_DIRECT_THREADS = (1, 4, 16)
"""Requests in flight tried by the Python O_DIRECT read that stands in for fio."""


def _python_direct_read(files: list[Path], threads: int = 1) -> tuple[int, float]:
    """Read ``files`` one after another with O_DIRECT in 4 MiB blocks, ``threads`` blocks in
    flight (thread t reads blocks t, t + threads, ...; ``os.preadv`` lets go of the GIL).
    Returns (bytes, seconds)."""

    def worker(fd: int, size: int, first: int) -> int:
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
        n = 0
        for off in range(first * BLOCK, size, threads * BLOCK):
            n += os.preadv(fd, [buf], off)
        return n

    total = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in files:
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            try:
                size = os.fstat(fd).st_size
                total += sum(pool.map(partial(worker, fd, size), range(threads)))
            finally:
                os.close(fd)
    return total, time.perf_counter() - t0


def _python_direct_limit(row: Row, files: list[Path], repeat: int) -> Row:
    """``row`` filled by the Python O_DIRECT read (no fio): each of :data:`PY_DIRECT_THREADS`
    once, then the fastest until it has ``repeat`` runs."""
    tries: dict[int, tuple[int, float]] = {}
    for threads in PY_DIRECT_THREADS:
        drop_caches()
        tries[threads] = _python_direct_read(files, threads)
    best = max(tries, key=lambda k: tries[k][0] / tries[k][1])
    row.nbytes, first = tries[best]
    row.runs = [first]
    for _ in range(repeat - 1):
        drop_caches()
        row.runs.append(_python_direct_read(files, best)[1])
    tried = ", ".join(f"{k}: {n / s / 1e9:.2f}" for k, (n, s) in tries.items())
    row.note = (f"fio not installed: Python O_DIRECT read, 4 MiB blocks, {best} in flight "
                f"(GB/s by requests in flight, one run each: {tried})")
    return row


def ssd_limit(m: Model, repeat: int) -> Row:
    """Sequential O_DIRECT reads of the model's sllm data files: every fio variant once, then the
    fastest one again until it has ``repeat`` runs; the row is that variant's median (a median,
    like the loaders' rows, not a lucky best on a disk whose speed moves from run to run)."""
    files = [m.sllm_dir / f.name for f in read_index(m.sllm_dir).files]
    row = Row("limit", "ssd", "cold", m.name, sum(f.stat().st_size for f in files), limit="fio")
    if shutil.which("fio") is None:
        return _python_direct_limit(row, files, repeat)
    sweep: dict[str, tuple[int, float]] = {}
    failed: list[str] = []
    for name, variant in FIO_VARIANTS.items():
        drop_caches()
        try:
            sweep[name] = _fio(files, variant)
        except (subprocess.CalledProcessError, ValueError, KeyError) as e:
            failed.append(f"{name} ({type(e).__name__})")
    sweep = {k: v for k, v in sweep.items() if v[1] > 0}
    if not sweep:
        row.note = "fio failed in every variant: " + ", ".join(failed)
        return row
    best = max(sweep, key=lambda k: sweep[k][0] / sweep[k][1])
    row.nbytes, first = sweep[best]
    row.runs = [first]
    for _ in range(repeat - 1):
        drop_caches()
        row.runs.append(_fio(files, FIO_VARIANTS[best])[1])
    tried = ", ".join(f"{k} {n / s / 1e9:.2f}" for k, (n, s) in sweep.items())
    row.note = f"fio --direct=1 --bs=4M --rw=read, {best} (GB/s, one run each: {tried})"
    if failed:
        row.note += "; failed: " + ", ".join(failed)
    return row


def dram_limit(m: Model) -> Row:
    """numpy.copyto between two pre-faulted arrays of the model's size, best of 3."""
    src = np.ones(m.nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)  # zeros_like writes it: both are faulted in
    runs: list[float] = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        runs.append(time.perf_counter() - t0)
    del src, dst
    gc.collect()
    return Row("limit", "dram", "n/a", m.name, m.nbytes, [min(runs)], limit="memcpy",
               note="numpy.copyto, pre-faulted, best of 3")


def h2d_limit(m: Model, device: str) -> Row:
    """``Tensor.copy_`` of the model's bytes from page-locked host memory to ``device``, best
    of 3 (after one untimed copy): the host-to-device link's limit."""
    src = torch.ones(m.nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(m.nbytes, dtype=torch.uint8, device=device)
    runs: list[float] = []
    for i in range(4):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        if i:
            runs.append(time.perf_counter() - t0)
    del src, dst
    free(None)
    return Row("limit", "h2d", "n/a", m.name, m.nbytes, [min(runs)], limit="h2d", device=device,
               note="pinned host -> device copy_, best of 3")
