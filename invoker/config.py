"""The invoker's configuration (every default in one place) and how a load's requested device
resolves on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from native_loader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS
from sllm.config import INVOKER_LEASE_TTL_S
from sllm.errors import Unavailable


@dataclass
class InvokerConfig:
    invoker_id: str
    url: str  # how others reach this invoker: http://host:port
    etcd_endpoint: str
    store_root: Path
    device: str = "cpu"  # where "auto" instances go
    memory_bytes: int = 8 << 30  # instance memory budget advertised to the controller
    verify_checksums: bool = True
    dram_pool_bytes: int = 4 << 30  # the DRAM tier's budget; 0 disables it
    read_threads: int = DEFAULT_THREADS  # the native reader's threads per load
    read_chunk_bytes: int = DEFAULT_CHUNK_BYTES  # bytes per read request
    tier_sync_s: float = 5.0  # how often checkpoint tiers are re-published (store changes)
    origin: Path | None = None  # the store root: where checkpoints come from with no local copy
    lease_ttl_s: int = INVOKER_LEASE_TTL_S  # the controller sees this invoker dead this long after
    network_bps: float | None = None  # cap on checkpoint fetches (bytes/s): an emulated link
    io_engine: str = "auto"  # checkpoint reads: "native" (this invoker was built for the C++
    # engine: without it, it runs degraded and says so), "python", or "auto" (native if built)


def resolve_device(requested: str, default: str) -> str:
    """The torch device for an instance: ``auto`` -> the invoker's device ``default``; ``cuda``
    -> ``default`` when that is a GPU, else ``cuda:0``; ``cpu`` and ``cuda:N`` as they are.
    Raises Unavailable when CUDA is asked for on an invoker without it."""
    if requested == "auto":
        return default
    if requested.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise Unavailable(f"device {requested!r} requested but this invoker has no CUDA device")
        if requested == "cuda":
            return default if default.startswith("cuda") else "cuda:0"
    return requested
