"""Page-cache control for the benchmarks: cold loads must come from the disk."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def drop_caches() -> bool:
    """Drop the whole page cache (root only). Returns whether it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def evict(paths: Iterable[Path]) -> None:
    """Evict files from the page cache (``posix_fadvise(DONTNEED)``; no root needed), so the
    next read of them comes from the disk while everything else stays cached, as on a node
    whose runtime is up and whose checkpoint has not been read lately."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
