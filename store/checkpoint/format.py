"""The loading-optimized checkpoint format (ServerlessLLM, OSDI'24 §4): its layout and its index.

A checkpoint is a folder::

    index.json          the CheckpointIndex below (format_version 1)
    data-00000.bin      tensor bytes back to back; every storage span starts at a multiple of
    data-00001.bin      ALIGNMENT (4096) bytes and the gaps are zeros, so direct I/O can read it
    ...                 (each file is padded to a multiple of ALIGNMENT as well)
    config.json         the transformers model config, without quantization_config
    tokenizer files     whatever ``tokenizer.save_pretrained`` writes

Tensors that share one torch storage (tied weights, a transposed view of another tensor) are
written once: the span of the storage covering all their views is stored, and each view has its
own entry (offset of its first element, shape, stride in elements). A loader that builds every
tensor as a strided view over the loaded bytes gets the sharing back.

Worked example: a float32 tensor ``w`` of shape (2, 3) and ``lm_head = w`` tied to it, then a
float16 tensor ``b`` of shape (5,). ``w``'s storage (24 bytes) goes at offset 0 of
``data-00000.bin``; both ``w`` and ``lm_head`` get ``offset=0, nbytes=24, shape=[2, 3],
stride=[3, 1]``. ``b`` goes at the next aligned offset, 4096, with ``nbytes=10``. The file is
padded to 8192 bytes; with 64 MiB chunks it has one xxh3_64 checksum.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_VERSION = 1
ALIGNMENT = 4096
"""Bytes every storage span (and every data file's length) is aligned to."""
DEFAULT_FILE_BYTES = 1 << 30
"""Target size of one data file; a span larger than it gets a file of its own."""
DEFAULT_CHUNK_BYTES = 64 << 20
"""Bytes covered by one checksum."""
INDEX_NAME = "index.json"
CONFIG_NAME = "config.json"

_DTYPE_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)
# Every dtype this torch build has, of a whole number of bytes per element. Quantized dtypes
# (qint8, ...) carry scale/zero-point outside the storage and sub-byte ints (int4, uint1, ...) have
# no item size, so neither is here.
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}

_FILE_NAME = re.compile(r"^data-\d{5}\.bin$")


def dtype_name(dtype: torch.dtype) -> str:
    """The index's name for ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises:
        ValueError: the dtype has no fixed item size or is quantized.
    """
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a checkpoint") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` in an index.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def data_file_name(i: int) -> str:
    """The name of the ``i``-th data file: ``data-00000.bin``, ``data-00001.bin``, ..."""
    return f"data-{i:05d}.bin"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def span_elements(shape: list[int] | tuple[int, ...], stride: list[int] | tuple[int, ...]) -> int:
    """Elements from a view's first element to one past its last (0 when it has no elements).

    For a contiguous view it is the element count; ``x[::2]`` of 10 elements spans 9."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((size - 1) * st for size, st in zip(shape, stride, strict=True))


class TensorEntry(BaseModel):
    """Where one tensor's bytes are.

    ``offset`` is the byte offset of the tensor's first element within its data file; ``nbytes``
    the bytes from there to the end of its last element (its span: ``span_elements * itemsize``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: int = Field(ge=0)
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    shape: list[int]
    stride: list[int]
    dtype: str

    @model_validator(mode="after")
    def _consistent(self) -> TensorEntry:
        dtype = torch_dtype(self.dtype)
        if len(self.shape) != len(self.stride):
            raise ValueError(f"shape {self.shape} and stride {self.stride} differ in rank")
        if any(s < 0 for s in self.shape) or any(s < 0 for s in self.stride):
            raise ValueError("shape and stride must not be negative")
        expected = span_elements(self.shape, self.stride) * dtype.itemsize
        if self.nbytes != expected:
            raise ValueError(f"nbytes {self.nbytes} != span of shape/stride {expected}")
        if self.offset % dtype.itemsize:
            raise ValueError(f"offset {self.offset} is not a multiple of {dtype.itemsize}")
        return self


class DataFile(BaseModel):
    """One data file: its name, size in bytes and the xxh3_64 hex digest of each chunk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size: int = Field(ge=0)
    chunk_bytes: int = Field(gt=0)
    checksums: list[str]

    @model_validator(mode="after")
    def _consistent(self) -> DataFile:
        if not _FILE_NAME.match(self.name):
            raise ValueError(f"bad data file name {self.name!r}")
        chunks = math.ceil(self.size / self.chunk_bytes)
        if len(self.checksums) != chunks:
            raise ValueError(f"{self.name}: {len(self.checksums)} checksums for {chunks} chunks")
        return self


class CheckpointIndex(BaseModel):
    """The whole ``index.json``: data files, tensor entries in state-dict order, and ``meta``
    (free-form; the importer records ``source``, ``dtype``, ``created`` (unix s) and ``name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = FORMAT_VERSION
    files: list[DataFile]
    tensors: dict[str, TensorEntry]
    total_bytes: int = Field(ge=0)
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointIndex:
        if self.total_bytes != sum(f.size for f in self.files):
            raise ValueError("total_bytes is not the sum of the file sizes")
        if len({f.name for f in self.files}) != len(self.files):
            raise ValueError("data file names repeat")
        for name, t in self.tensors.items():
            if t.file >= len(self.files):
                raise ValueError(f"tensor {name!r} names file {t.file} of {len(self.files)}")
            f = self.files[t.file]
            if t.offset + t.nbytes > f.size:
                raise ValueError(
                    f"tensor {name!r} at offset {t.offset} + {t.nbytes} bytes points outside "
                    f"{f.name} ({f.size} bytes)"
                )
        return self
