"""The pure-Python twin of the native I/O engine.

Same API as the C++ engine (:mod:`native_loader._engine`): a :class:`PyReader` with a pool of
threads reads byte ranges of files into memory given by address; :func:`read_files` reads whole
files into one buffer on top of any reader. The C++ engine replaces this where it is built; the
tests run against both. This twin uses buffered ``preadv`` (Python's ``os`` has no aligned
allocation of its own, and the GIL is released during each read).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, Self

DEFAULT_CHUNK_BYTES = 16 << 20
"""Bytes per read request (why: docs/architecture.md, Decisions, "Reads")."""

DEFAULT_THREADS = 4
"""Reader threads (why: docs/architecture.md, Decisions, "Reads")."""


class ReadError(OSError):
    """A read failed: missing or unreadable file, or the file ended before the range did. The
    message names the file and the byte offset.

    Attributes:
        path: the file.
        offset: the byte offset within the file where the failure happened.
    """

    def __init__(self, err: int, message: str, *, path: str, offset: int) -> None:
        super().__init__(err, message)
        self.path = path
        self.offset = offset


class Reader(Protocol):
    """What both engines offer."""

    def submit(self, path: str, file_offset: int, nbytes: int, dest: int) -> int: ...
    def wait(self, ticket: int) -> int: ...
    def close(self) -> None: ...


class PyReader:
    """Reads byte ranges of files into memory with a pool of threads.

    Args:
        threads: reader threads.
        direct: ask for O_DIRECT reads (ignored by this twin: it always reads through the page
            cache; the attribute says so with ``direct = False``).
    """

    def __init__(self, threads: int = DEFAULT_THREADS, direct: bool = True) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.direct = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sllm-read")
        self._futures: dict[int, Future[int]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def submit(self, path: str, file_offset: int, nbytes: int, dest: int) -> int:
        """Queue a read of ``nbytes`` bytes at ``file_offset`` of ``path`` into memory at address
        ``dest``. The caller keeps that memory alive until :meth:`wait` returns. Returns a ticket.

        Raises:
            ValueError: a negative offset or size, or a null destination.
        """
        if file_offset < 0 or nbytes < 0 or (nbytes and not dest):
            raise ValueError(f"{path}: bad read request (offset {file_offset}, {nbytes} bytes)")
        with self._lock:
            ticket = self._next
            self._next += 1
            self._futures[ticket] = self._pool.submit(_pread_into, path, file_offset, nbytes, dest)
        return ticket

    def wait(self, ticket: int) -> int:
        """Block until a read is done; returns its byte count.

        Raises:
            ReadError: the read failed (names the file and the offset).
            KeyError: an unknown or already-waited ticket.
        """
        with self._lock:
            fut = self._futures.pop(ticket)
        return fut.result()

    def close(self) -> None:
        """Wait for reads in flight and stop the threads."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_into(path: str, file_offset: int, nbytes: int, dest: int) -> int:
    target = (ctypes.c_char * nbytes).from_address(dest) if nbytes else bytearray()
    view = memoryview(target).cast("B")
    done = 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ReadError(e.errno or errno.EIO, f"{path}: cannot open: {e.strerror or e}",
                        path=path, offset=file_offset) from e
    try:
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], file_offset + done)
            if n == 0:
                raise ReadError(errno.EIO, f"{path}: short read: file ended at offset "
                                f"{file_offset + done}, expected {file_offset + nbytes}",
                                path=path, offset=file_offset + done)
            done += n
    except ReadError:
        raise
    except OSError as e:
        raise ReadError(e.errno or errno.EIO, f"{path}: cannot read at offset {file_offset + done}: "
                        f"{e.strerror or e}", path=path, offset=file_offset + done) from e
    finally:
        os.close(fd)
    return done


def buffer_address(dest: Any) -> tuple[int, int]:
    """(address, length in bytes) of a writable C-contiguous buffer: a bytearray, a numpy array,
    a memoryview, or anything with ``data_ptr()`` and ``nbytes`` (a CPU torch tensor).

    Raises:
        ValueError: read-only or non-contiguous.
    """
    if hasattr(dest, "data_ptr") and hasattr(dest, "is_contiguous"):
        if not dest.is_contiguous():
            raise ValueError("dest tensor is not contiguous")
        return int(dest.data_ptr()), int(dest.numel() * dest.element_size())
    view = memoryview(dest).cast("B")
    if view.readonly:
        raise ValueError("dest is read-only")
    if len(view) == 0:
        return 0, 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view)


def read_files(
    files: Sequence[tuple[str, int, int]],
    dest: Any,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    reader: Reader | None = None,
) -> int:
    """Read each file whole into its place in ``dest``, in chunks, all in flight at once.

    Args:
        files: ``(path, dest_offset, nbytes)`` per file; the file must be exactly ``nbytes``
            long and lands in ``dest[dest_offset:dest_offset + nbytes]``.
        dest: a writable C-contiguous buffer (see :func:`buffer_address`).
        chunk_bytes: bytes per read request.
        reader: the engine to use (default: a new :func:`native_loader.default_reader`).

    Returns:
        The total number of bytes read.

    Raises:
        ValueError: a range falls outside ``dest``, or ``chunk_bytes`` is not positive.
        ReadError: a file is missing, unreadable, shorter or longer than ``nbytes`` (names the
            file and the offset).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    base, size = buffer_address(dest)
    for path, offset, nbytes in files:
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise ValueError(f"{path}: range [{offset}, {offset + nbytes}) is outside the "
                             f"{size}-byte dest")
    own = reader is None
    if reader is None:
        from native_loader import default_reader

        reader = default_reader()
    try:
        tickets = []
        for path, offset, nbytes in files:
            check_size(path, nbytes)
            for at in range(0, nbytes, chunk_bytes):
                n = min(chunk_bytes, nbytes - at)
                tickets.append(reader.submit(path, at, n, base + offset + at))
        total = 0
        error: ReadError | None = None
        for t in tickets:  # wait for all, even after a failure: the memory must stay untouched
            try:
                total += reader.wait(t)
            except ReadError as e:
                error = error or e
        if error is not None:
            raise error
        return total
    finally:
        if own:
            reader.close()


def check_size(path: str, nbytes: int) -> None:
    """Raise ReadError unless ``path`` exists and is exactly ``nbytes`` long."""
    try:
        actual = os.stat(path).st_size
    except OSError as e:
        raise ReadError(e.errno or errno.EIO, f"{path}: cannot open: {e.strerror or e}",
                        path=path, offset=0) from e
    if actual < nbytes:
        raise ReadError(errno.EIO, f"{path}: short read: file ended at offset {actual}, "
                        f"expected {nbytes} bytes", path=path, offset=actual)
    if actual > nbytes:
        raise ReadError(errno.EIO, f"{path}: file is longer than the expected {nbytes} bytes",
                        path=path, offset=nbytes)
