"""The output: a header saying what qualifies the figures (the machine, the device, the loader's
engine, whether cold rows could drop the page cache, what other processes did during the run),
then the rows as a table and the targets met or not; with ``--json``, one JSON object per row on
stdout and the header on stderr.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import native_loader
from bench.loading.row import Row
from bench.stats import memory_bytes


def header(rows: list[Row], device: str, can_drop: bool, repeat: int,
           activity: tuple[float, float, float]) -> list[str]:
    """The header's lines. ``activity`` is what :meth:`Neighbours.since` answered for the run:
    (seconds, bytes other processes read from disk, CPU seconds they used); the run is BUSY when
    those bytes passed 5% of the rows' bytes or that CPU time 10% of the machine's."""
    wall, other_disk, other_cpu = activity
    cpus = os.cpu_count() or 1
    busy = other_disk > 0.05 * sum(r.nbytes for r in rows) or other_cpu > 0.1 * wall * cpus
    engine = ("C++ engine, O_DIRECT" if native_loader.NATIVE
              else "pure-Python twin (buffered preadv: the C++ engine is not built)")
    mem = memory_bytes() / 2**30
    return [
        f"machine: {os.cpu_count()} CPUs, {mem:.1f} GiB memory; torch {torch.__version__}",
        f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device != "cpu"
                               else ""),
        f"native_loader engine: {engine}",
        "page cache: dropped before each cold load" if can_drop
        else "page cache: could NOT be dropped (needs root): cold rows left out",
        f"seconds: median of {repeat}; every row includes "
        + ("touching one byte per 4 KiB page" if device == "cpu" else "torch.cuda.synchronize()"),
        f"other processes during the {wall:.0f} s run: {other_disk / 1e9:.1f} GB read from "
        f"disk, {other_cpu:.0f} CPU-seconds ({100 * other_cpu / (wall * cpus):.0f}% of the "
        f"machine)" + ("  BUSY: the figures are lower than on a quiet machine" if busy else ""),
    ]


def _fmt(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``, or ``-`` for no figure."""
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row], header: list[str]) -> None:
    """The header, a blank line, then one line per row (bytes in MB, 1e6 bytes)."""
    for line in header:
        print(line)
    print()
    print(f"{'model':<10} {'loader':<22} {'tier':<10} {'cache':<5} {'bytes':>9} {'seconds':>8} "
          f"{'GB/s':>7} {'% limit':>12}  note")
    for r in rows:
        pct = f"{r.pct:.0f}% {r.limit}" if r.pct is not None else ""
        print(f"{r.model:<10} {r.loader:<22} {r.tier:<10} {r.cache:<5} {r.nbytes / 1e6:>6.0f} MB "
              f"{_fmt(r.seconds, '.3f'):>8} {_fmt(r.gbps, '.2f'):>7} {pct:>12}  {r.note}")


def targets(rows: list[Row]) -> list[str]:
    """One line per target of sllm's loader: the SSD tier cold at least 90% of its limit, the
    DRAM tier at least 80%."""
    out: list[str] = []
    for r in rows:
        if r.loader != "native_loader" or r.pct is None:
            continue
        if r.tier == "ssd" and r.cache == "cold":
            out.append(f"target SSD tier >= 90% of {r.limit}, {r.model}: {r.pct:.0f}% "
                       f"({'met' if r.pct >= 90 else 'NOT met'})")
        if r.tier == "dram":
            out.append(f"target DRAM tier >= 80% of {r.limit}, {r.model} ({r.cache}): "
                       f"{r.pct:.0f}% ({'met' if r.pct >= 80 else 'NOT met'})")
    return out


def print_report(rows: list[Row], header: list[str], as_json: bool) -> None:
    """The whole output: the table and the targets, or with ``as_json`` the rows as JSON lines
    on stdout and what qualifies them (the header) on stderr."""
    if as_json:
        for line in header:
            print(line, file=sys.stderr, flush=True)
        for r in rows:
            print(json.dumps(r.as_json()))
        return
    print_table(rows, header)
    print()
    for line in targets(rows):
        print(line)
