"""Read whole files into one destination buffer: the pure-Python twin of the native I/O engine.

The native engine implements :func:`read_files` with this exact signature; this module is the
reference it is tested against, and the fallback when the extension is not built.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

DEFAULT_CHUNK_BYTES = 32 << 20
"""Bytes asked of the kernel in one ``readinto`` call."""


class ReadError(OSError):
    """A file could not be read into the buffer: missing, unreadable, shorter or longer than the
    caller said. The message names the file and the byte offset where reading stopped.

    Attributes:
        path: the file.
        offset: the byte offset within the file where the failure happened.
    """

    def __init__(self, err: int, message: str, *, path: str, offset: int) -> None:
        super().__init__(err, message)
        self.path = path
        self.offset = offset


def read_files(
    files: Sequence[tuple[str, int, int]],
    dest: Any,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Read each file whole into its place in ``dest``.

    Args:
        files: ``(path, dest_offset, nbytes)`` per file; the file must be exactly ``nbytes`` long
            and lands in ``dest[dest_offset:dest_offset + nbytes]``.
        dest: a writable, C-contiguous buffer (bytearray, memoryview, numpy array, the ``.numpy()``
            of a CPU uint8 torch tensor); read into in place with ``readinto``, no extra copies.
        chunk_bytes: bytes per ``readinto`` call.

    Returns:
        The total number of bytes read.

    Raises:
        ValueError: a range falls outside ``dest``, or ``chunk_bytes`` is not positive.
        ReadError: a file is missing or unreadable (errno from the OS), shorter than ``nbytes``
            or longer than it (``EIO``); the message names the file and the offset.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = memoryview(dest).cast("B")
    if view.readonly:
        raise ValueError("dest is read-only")
    for path, offset, nbytes in files:
        if offset < 0 or nbytes < 0 or offset + nbytes > len(view):
            raise ValueError(
                f"{path}: range [{offset}, {offset + nbytes}) is outside the {len(view)}-byte dest"
            )
    total = 0
    for path, offset, nbytes in files:
        total += _read_one(path, view[offset : offset + nbytes], chunk_bytes)
    return total


def _read_one(path: str, target: memoryview, chunk_bytes: int) -> int:
    """Fill ``target`` with the whole of ``path``; see :func:`read_files` for the errors."""
    done = 0
    try:
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while done < len(target):
                n = f.readinto(target[done : done + chunk_bytes])
                if not n:
                    raise ReadError(
                        errno.EIO,
                        f"{path}: short read: file ended at offset {done}, "
                        f"expected {len(target)} bytes",
                        path=path,
                        offset=done,
                    )
                done += n
            if f.read(1):
                raise ReadError(
                    errno.EIO,
                    f"{path}: file is longer than the expected {len(target)} bytes",
                    path=path,
                    offset=done,
                )
    except ReadError:
        raise
    except OSError as e:
        raise ReadError(
            e.errno or errno.EIO,
            f"{path}: cannot read at offset {done}: {e.strerror or e}",
            path=path,
            offset=done,
        ) from e
    return done
