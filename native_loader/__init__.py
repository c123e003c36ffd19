"""native_loader: the narrow I/O engine that reads checkpoint data files into memory.

A reader has a pool of threads and reads byte ranges of files into memory given by address
(``submit(path, file_offset, nbytes, dest) -> ticket``, ``wait(ticket) -> bytes``), so a caller
can keep many chunks in flight and consume each (verify its checksum, copy it to a GPU) while
later ones are still being read. The C++ engine (:mod:`native_loader._engine`: O_DIRECT where the
filesystem allows it, buffered reads where it refuses, the GIL released) is used when it is
built; :class:`~native_loader.reader.PyReader` is its pure-Python twin with the same API.
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
    from native_loader._engine import NativeReader  # type: ignore[import-not-found]
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
