"""Page-cache control for the benchmarks: cold loads must come from the disk.

    .venv/bin/python -m bench.pagecache FILE [FILE ...]   # evict these files (no root needed)
    .venv/bin/python -m bench.pagecache --all              # drop the whole page cache (root)

The benchmarks call :func:`evict` and :func:`drop_caches` before each cold load; the command
does the same by hand, e.g. before timing a cold start of your own.
"""

from __future__ import annotations

import argparse
import os
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pagecache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="files to evict from the page cache")
    ap.add_argument("--all", action="store_true",
                    help="drop the whole page cache instead (root only)")
    args = ap.parse_args()
    if args.all:
        if not drop_caches():
            sys.exit("pagecache: could not drop the page cache (needs root)")
        return
    if not args.files:
        ap.error("name the files to evict, or --all")
    try:
        evict(args.files)
    except OSError as e:
        sys.exit(f"pagecache: {e}")


if __name__ == "__main__":
    main()
