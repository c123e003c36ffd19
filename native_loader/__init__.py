"""native_loader: the narrow I/O engine that reads checkpoint data files into memory.

A reader has a pool of threads and reads byte ranges of files into memory given by address
(``submit(path, file_offset, nbytes, dest) -> ticket``, ``wait(ticket) -> bytes``), so a caller
can keep many chunks in flight and consume each (verify its checksum, copy it to a GPU) while
later ones are still being read. The C++ engine (:mod:`native_loader._engine`: O_DIRECT where the
filesystem allows it, buffered reads where it refuses, the GIL released) is used when it is
built; :class:`~native_loader.reader.PyReader` is its pure-Python twin with the same API.

The C++ engine
--------------
``engine.h``/``engine.cpp`` are the core (C++17 and POSIX only; the header's comment gives the
algorithm), ``uring.h``/``uring.cpp`` its io_uring backend (raw syscalls, no liburing),
``binding.cpp`` the Python module (pybind11), built by ``setup.py`` on ``pip install``.
Two backends behind one API (``NativeReader(threads, direct, backend="auto")``):

- ``io_uring`` (chosen by ``auto`` where the kernel allows it): one thread owns a ring and keeps
  up to 64 reads of at most 8 MiB in flight; ``submit`` wakes it through an eventfd;
- ``threads``: ``threads`` workers serve one FIFO queue with ``pread``.

Either way requests finish about in the order they were submitted, so a caller waiting in that
order works while later reads are in flight. With ``direct=True`` the part of a request whose
address, file offset and length are multiples of 4096 is read with O_DIRECT (no copy through the
page cache: about 0.03-0.04 CPU-seconds per GB here against 0.2 buffered); the rest (a file's
partial last page, an odd address) and files on filesystems that refuse O_DIRECT are read
buffered. ``direct_bytes`` and ``buffered_bytes`` count which way the bytes went, ``backend``
says which backend runs. ``close()`` finishes the queued reads before it returns.
"""

from __future__ import annotations

from native_loader.reader import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_THREADS,
    PyReader,
    Reader,
    ReadError,
    buffer_address,
    read_files,
)

try:  # the C++ engine, built by the project's setup
    from native_loader._engine import NativeReader  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # not built (an editable checkout before `pip install -e .`)
    NativeReader = None

NATIVE = NativeReader is not None
"""Whether the C++ engine is available."""


def default_reader(threads: int = DEFAULT_THREADS, direct: bool = True) -> Reader:
    """The C++ engine when built, else the pure-Python twin."""
    if NativeReader is not None:
        return NativeReader(threads, direct)  # type: ignore[no-any-return]
    return PyReader(threads, direct)


__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_THREADS", "NATIVE", "NativeReader", "PyReader", "ReadError",
    "Reader", "buffer_address", "default_reader", "read_files",
]
