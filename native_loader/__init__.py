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

from typing import Literal

from native_loader.reader import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_THREADS,
    PyReader,
    Reader,
    ReadError,
    buffer_address,
    read_files,
)

NATIVE_ERROR: str | None = None
"""Why the C++ engine cannot be imported (None: it can)."""

try:  # the C++ engine, built by the project's setup
    from native_loader._engine import NativeReader  # type: ignore[import-not-found,unused-ignore]
except ImportError as e:  # not built (setup.py left out, no compiler), or built for another Python
    NativeReader = None
    NATIVE_ERROR = f"{type(e).__name__}: {e}"

NATIVE = NativeReader is not None
"""Whether the C++ engine is available."""

ENGINES = ("auto", "native", "python")
"""What a process may ask for: ``native`` (the C++ engine), ``python`` (:class:`PyReader`), or
``auto`` (the C++ engine when built, else the Python reader)."""


def choose_engine(wanted: str) -> tuple[Literal["native", "python"], str | None]:
    """The engine a process asking for ``wanted`` (one of :data:`ENGINES`) reads with:
    ``("native" | "python", problem)``, where ``problem`` says why the C++ engine is not used
    although it was wanted (``native``) or could have been (``auto``), and None otherwise.

    Raises:
        ValueError: ``wanted`` is not one of :data:`ENGINES`.
    """
    if wanted not in ENGINES:
        raise ValueError(f"unknown I/O engine {wanted!r}; use one of {', '.join(ENGINES)}")
    if wanted == "python":
        return "python", None
    if NATIVE:
        return "native", None
    return "python", (f"the native I/O engine cannot be loaded ({NATIVE_ERROR}); checkpoints are "
                      "read by the Python reader, which is slower and copies through the page cache")


def default_reader(threads: int = DEFAULT_THREADS, direct: bool = True, engine: str = "auto"
                   ) -> Reader:
    """A reader of ``engine``: ``auto`` (the C++ engine when built, else the pure-Python twin),
    ``native`` or ``python``.

    Raises:
        ValueError: an unknown engine, or ``native`` when the C++ engine is not built.
    """
    running, _ = choose_engine(engine)
    if engine == "native" and running != "native":
        raise ValueError(f"the native I/O engine is not available: {NATIVE_ERROR}")
    if running == "native":
        return NativeReader(threads, direct)  # type: ignore[no-any-return,misc]
    return PyReader(threads, direct)


__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_THREADS", "ENGINES", "NATIVE", "NATIVE_ERROR", "NativeReader",
    "PyReader", "ReadError", "Reader", "buffer_address", "choose_engine", "default_reader",
    "read_files",
]
