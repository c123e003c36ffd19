"""Loading-optimized checkpoints: the format, writing one, and loading one into a single buffer."""

from __future__ import annotations

from store.checkpoint.format import (
    ALIGNMENT,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_FILE_BYTES,
    DTYPES,
    FORMAT_VERSION,
    CheckpointIndex,
    DataFile,
    TensorEntry,
    dtype_name,
    torch_dtype,
)
from store.checkpoint.loader import LoadedCheckpoint, file_offsets, load_checkpoint, read_index
from store.checkpoint.writer import write_checkpoint, write_config, write_tensors

__all__ = [
    "ALIGNMENT",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_FILE_BYTES",
    "DTYPES",
    "FORMAT_VERSION",
    "CheckpointIndex",
    "DataFile",
    "LoadedCheckpoint",
    "TensorEntry",
    "dtype_name",
    "file_offsets",
    "load_checkpoint",
    "read_index",
    "torch_dtype",
    "write_checkpoint",
    "write_config",
    "write_tensors",
]
