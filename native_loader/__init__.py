"""The narrow I/O engine that reads checkpoint data files into one buffer.

For now :func:`read_files` is the pure-Python path in :mod:`native_loader.reader`; the next issue
adds a C++ engine (direct I/O, several threads, GIL released) that replaces it behind the same
signature, and the same tests run against both.
"""

from __future__ import annotations

from native_loader.reader import DEFAULT_CHUNK_BYTES, ReadError, read_files

__all__ = ["DEFAULT_CHUNK_BYTES", "ReadError", "read_files"]
