"""What other processes did to the machine while the benchmark ran: the bytes they read from the
disks and the CPU seconds they used compete with the loads, so the header reports them.

Both are the machine's totals (``/proc/diskstats``, ``/proc/stat``) less this process's own
(``/proc/self/io``, ``os.times``) and fio's reads (:data:`FIO_READ_BYTES`, which the SSD limit
adds to: fio's reads are not this process's).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def _disk_read_bytes() -> int:
    """Bytes read so far from the machine's whole disks (``/proc/diskstats``)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and Path(f"/sys/block/{f[2]}").exists():
            total += int(f[5]) * 512
    return total


def _busy_cpu_seconds() -> float:
    """CPU seconds spent by everything on the machine so far (``/proc/stat``, not idle/iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(x) for x in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_read_bytes() -> int:
    """Bytes this process has read from storage so far (``/proc/self/io`` ``read_bytes``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


FIO_READ_BYTES = [0]
"""Bytes fio read for this run (its reads are not this process's)."""


@dataclass
class Neighbours:
    """What other processes did to the machine while the benchmark ran: their disk reads and
    CPU time compete with the loads, so the output reports them."""

    wall: float  # perf_counter seconds
    disk: int  # bytes read from the disks by everything
    cpu: float  # CPU seconds used by everything
    own_read: int  # bytes read by this process and fio
    own_cpu: float  # CPU seconds of this process and its children

    @staticmethod
    def now() -> Neighbours:
        """The counters as they are now."""
        t = os.times()
        return Neighbours(time.perf_counter(), _disk_read_bytes(), _busy_cpu_seconds(),
                          _own_read_bytes() + FIO_READ_BYTES[0],
                          t.user + t.system + t.children_user + t.children_system)

    def since(self, start: Neighbours) -> tuple[float, float, float]:
        """(seconds, bytes other processes read from disk, CPU seconds they used) since start."""
        wall = self.wall - start.wall
        disk = (self.disk - start.disk) - (self.own_read - start.own_read)
        cpu = (self.cpu - start.cpu) - (self.own_cpu - start.own_cpu)
        return wall, max(0.0, disk), max(0.0, cpu)
