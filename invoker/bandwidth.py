"""An invoker's measured bandwidths, which the scheduler's startup-time estimates divide by.

ServerlessLLM's scheduler (OSDI'24 §6) estimates loading time as checkpoint size / bandwidth of
the tier holding it; its code hard-codes those bandwidths. Ours measures them on each invoker:

- a short probe at start-up seeds each (:func:`probe`): write a temporary file and fsync it
  (the copy bandwidth: a transfer ends in a local write, so on one machine that is its bound),
  drop it from the page cache and read it back with the native reader (SSD), copy it in memory
  (DRAM);
- then every load and transfer of the invoker's own updates an exponentially weighted moving
  average (:class:`BandwidthMeter`), so the figures follow the disk as its speed drifts.
  The network figure's seed is only a stand-in (a transfer also reads from its source, crosses
  HTTP and is verified, under whatever else the machine is doing): the first real transfer
  replaces it rather than being averaged with it (why: docs/architecture.md, Decisions).

Worked example: a meter seeded at 2 GB/s for SSD with ``alpha`` 0.3 that sees a 1 GB load take
1 s (1 GB/s) moves to 0.3 * 1 + 0.7 * 2 = 1.7 GB/s. Seeded at 0.5 GB/s for the network, a 1 GB
transfer in 10 s sets it to 0.1 GB/s, and a second one at 0.2 GB/s moves it to 0.13 GB/s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from native_loader import default_reader, read_files
from sllm.messages import BandwidthRecord

log = logging.getLogger(__name__)

Kind = Literal["dram", "ssd", "network"]

PROBE_BYTES = 64 << 20
"""Bytes of the start-up probe's file: large enough to leave the page cache's and the
device's fixed costs behind, small enough to take well under a second."""


@dataclass(frozen=True)
class ProbeResult:
    """Bandwidths the probe measured, bytes per second."""

    dram_bps: float
    ssd_bps: float
    write_bps: float


def probe(folder: Path, nbytes: int = PROBE_BYTES, engine: str = "auto") -> ProbeResult:
    """Measure write, SSD read and DRAM copy bandwidth with a temporary file in ``folder``.

    Args:
        folder: a folder on the disk the model store uses.
        nbytes: size of the probe file (bytes).
        engine: the I/O engine the SSD read uses (:func:`native_loader.default_reader`): the
            one loads will use.

    Raises:
        OSError: the folder cannot be written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".bandwidth-probe-{os.getpid()}"
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)  # incompressible
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, memoryview(data))
            os.fsync(fd)
            write_s = time.perf_counter() - t0
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        buf = np.empty(nbytes, dtype=np.uint8)
        buf.fill(0)  # first touch, not timed
        with default_reader(engine=engine) as reader:
            t0 = time.perf_counter()
            read_files([(str(path), 0, nbytes)], buf, reader=reader)
            ssd_s = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    out = np.empty_like(buf)
    np.copyto(out, buf)  # first touch of ``out``'s pages, not timed
    t0 = time.perf_counter()
    np.copyto(out, buf)
    dram_s = time.perf_counter() - t0
    return ProbeResult(dram_bps=nbytes / max(dram_s, 1e-9), ssd_bps=nbytes / max(ssd_s, 1e-9),
                       write_bps=nbytes / max(write_s, 1e-9))


class BandwidthMeter:
    """Exponentially weighted moving averages of an invoker's bandwidths (bytes per second).
    Thread-safe: loads report from worker threads.

    Args:
        seed: the probe's figures (the network is seeded with the write bandwidth).
        alpha: weight of a new sample, 0 < alpha <= 1.
        min_bytes: samples smaller than this are ignored (their fixed costs dominate).
    """

    STAND_INS: frozenset[Kind] = frozenset({"network"})
    """Kinds whose seed measures a different operation: the first sample replaces it."""

    def __init__(self, seed: ProbeResult, *, alpha: float = 0.3, min_bytes: int = 8 << 20) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._alpha = alpha
        self._min_bytes = min_bytes
        self._lock = threading.Lock()
        self._bps: dict[Kind, float] = {"dram": seed.dram_bps, "ssd": seed.ssd_bps,
                                         "network": seed.write_bps}
        self._samples = 0
        self._measured: set[Kind] = set()

    def observe(self, kind: Kind, nbytes: int, seconds: float) -> bool:
        """Fold one measurement in: ``nbytes`` moved in ``seconds`` from tier ``kind``.
        Returns whether it counted (large enough, positive time)."""
        if nbytes < self._min_bytes or seconds <= 0:
            return False
        with self._lock:
            if kind in self.STAND_INS and kind not in self._measured:
                self._bps[kind] = nbytes / seconds
            else:
                self._bps[kind] = self._alpha * (nbytes / seconds) + (1 - self._alpha) * self._bps[kind]
            self._measured.add(kind)
            self._samples += 1
        return True

    def snapshot(self) -> BandwidthRecord:
        """The current figures, as published in the invoker's record."""
        with self._lock:
            return BandwidthRecord(dram_bps=self._bps["dram"], ssd_bps=self._bps["ssd"],
                                   network_bps=self._bps["network"], samples=self._samples)
