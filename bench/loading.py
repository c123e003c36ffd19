"""Checkpoint loading throughput: sllm's loader from the SSD and DRAM tiers against the loaders a
user would pick instead, and against this machine's limits measured in the same run.

    .venv/bin/python -m bench.loading [--models smollm2,synthetic] [--synthetic-gb 2.2]
                                      [--repeat 3] [--data DIR] [--skip-peers] [--json]
                                      [--device cpu|cuda:N]

Run it as root: cold rows drop the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``)
before each timed load; where the machine refuses, the cold rows are left out and the output says
so. Warm rows load once untimed, then time the next loads (the files sit in the page cache).

Models (every loader reads the same tensors, stored in each loader's own format):

- ``smollm2``: the real SmolLM2-135M-Instruct of the model store, float32 (538 MB; imported
  first when missing). Its tied ``lm_head.weight`` is stored once, as the embedding.
- ``synthetic``: a Llama of hidden 2048, intermediate 5632, 32 heads (4 KV heads), vocab 32000,
  bfloat16, random weights, with as many layers as make ``--synthetic-gb`` (22 layers: 2.2 GB,
  the shape of TinyLlama-1.1B).

The files are written once under ``--data`` (default ``$SLLM_HOME/bench-data``) and reused: an
sllm checkpoint, ``hf/model.safetensors`` with ``hf/config.json``, and ``model.pt``. SmolLM2's
sllm checkpoint is the store's own.

Rows (``seconds``: median of ``--repeat`` runs, from calling the loader until every weight is in
memory and usable; ``GB/s``: the model's weight bytes over that). Each loader first loads once
untimed, so one-time costs (lazy imports, first calls) are not counted as loading:

- ``native_loader`` tier ``ssd``: ``load_checkpoint(path, pool=pool)`` on a ``DramPool`` that
  does not hold the checkpoint, so it is read from the data files into the pool's pre-faulted
  memory. One pool per model, allocated and pre-faulted untimed (an invoker does it once at
  start-up) and emptied before each of these loads; its very first load, into memory nothing
  had been read into yet, is reported in the note (slower on this VM);
- ``native_loader`` tier ``dram``: the next ``load_checkpoint`` of the same checkpoint on the
  same pool, served from the pool;
- ``native_loader-nopool`` tier ``ssd``: ``load_checkpoint(path)`` without a pool, into memory
  allocated by the load (so it pays the kernel's first-touch page faults, as every peer does);
- ``safetensors``: ``safetensors.torch.load_file(file, device="cpu")``;
- ``torch.load``: ``torch.load(file, map_location="cpu", weights_only=True)`` (its default,
  non-mmap mode);
- ``from_pretrained``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=<checkpoint dtype>)``,
  so this row includes building the model (transformers is imported before timing);
- ``runai-model-streamer``: ``SafetensorsStreamer().stream_file(file)`` then every tensor of
  ``get_tensors()`` (owned tensors, default concurrency and memory limit);
- ``fastsafetensors``: ``SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)``,
  ``add_filenames``, ``copy_files_to_device()``, then ``get_tensor`` of every key (its
  documented CPU / no-GDS path);
- ``limit`` tier ``ssd``: ``fio`` sequential read with O_DIRECT in 4 MiB blocks of the model's
  own sllm data files (one job per file, one after another): median of ``--repeat`` runs of
  the fastest of ``psync``, ``libaio`` at ``--iodepth`` 8, 32 and 128, ``psync --numjobs=4``,
  and ``io_uring --fixedbufs`` at ``--iodepth`` 64 and 128 (the note names the winner and every
  variant's figure; this machine's virtual disk gets faster with more requests in flight);
  without ``fio``, a Python O_DIRECT read of the same files, labelled so;
- ``limit`` tier ``dram``: ``numpy.copyto`` between two pre-faulted arrays of the model's size,
  best of 3.

With ``--device cuda:N`` every loader puts the weights on that GPU: sllm's loader with
``load_checkpoint(..., device=...)`` (SSD tier: read into the pool block and copied chunk by chunk
as each is verified; DRAM tier: one copy from the pool; no pool: through the ring of page-locked
staging chunks), ``safetensors`` with ``device=``, ``torch.load`` with ``map_location=``,
``from_pretrained`` with ``device_map=``, the other peers' tensors moved with ``.to(device)``
(fastsafetensors loads to the device itself). A row ends with ``torch.cuda.synchronize()``
instead of the page touching (device memory is never mapped lazily), so ``touch_seconds`` is 0.
The limits gain ``limit`` tier ``h2d``: ``Tensor.copy_`` of the model's bytes from page-locked
host memory to the GPU, best of 3. Rows that read from memory are compared with it, and rows
with tier ``ssd`` with the slower of fio and h2d (the bytes cross both). Target: the DRAM tier
at least 80% of h2d.

"Usable": some loaders map the file and read it only when a page is first touched
(``safetensors`` on CPU, ``from_pretrained``), so every row, sllm's included, ends by reading one
byte of every 4 KiB page of every tensor (and its last byte); that pass is inside the timed region
and reported on its own as ``touch_seconds``. Rows with tier ``ssd`` are compared with the fio
limit; rows that read from memory (the DRAM tier, and the peers' warm rows, which read the page
cache, shown as tier ``page-cache``) with the memcpy limit. Targets: the SSD tier cold at least
90% of fio, the DRAM tier at least 80% of memcpy.

A peer that cannot be imported or fails keeps its row, with the reason and no figure. The
header reports what other processes did during the run (disk bytes read, CPU seconds) and says
BUSY when they were enough to lower the figures.
``--json`` prints one JSON object per row (``loader``, ``tier``, ``cache``, ``model``, ``bytes``,
``seconds``, ``gbps``, ``limit``, ``pct_of_limit``, ``runs``, ``touch_seconds``, ``note``); the
limit rows have ``loader: "limit"``; every row also has ``device``.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import native_loader
from bench.pagecache import drop_caches
from bench.stats import median, memory_bytes
from sllm import config
from store.checkpoint import (
    ALIGNMENT,
    load_checkpoint,
    read_index,
    write_checkpoint,
)
from store.checkpoint.format import align_up
from store.dram_pool import DramPool
from store.importer import import_model
from store.model_store import ModelStore

PAGE = 4096
SMOLLM2 = "smollm2-135m-instruct"
SYNTH_SHAPE = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
}
SYNTH_DTYPE = torch.bfloat16


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """One model's weights in every format the loaders read."""

    name: str
    sllm_dir: Path  # sllm checkpoint
    hf_dir: Path  # model.safetensors + config.json
    pt_file: Path  # torch.save of the state dict
    nbytes: int  # weight bytes (each storage once)
    dtype: torch.dtype

    @property
    def st_file(self) -> Path:
        return self.hf_dir / "model.safetensors"


def _write_peer_formats(folder: Path, tensors: dict[str, torch.Tensor], hf_config: dict[str, Any],
                        ) -> None:
    """safetensors (+ config.json, so from_pretrained works) and torch.save of ``tensors``, each
    written beside its final name and renamed, so a killed run leaves nothing half written."""
    from safetensors.torch import save_file

    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tmp = hf / f".model.safetensors.{uuid.uuid4().hex[:8]}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.rename(tmp, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(hf_config, indent=1) + "\n")
    tmp = folder / f".model.pt.{uuid.uuid4().hex[:8]}"
    torch.save(tensors, tmp)
    os.rename(tmp, folder / "model.pt")
    os.sync()


def _ready(folder: Path) -> bool:
    return (folder / "hf" / "model.safetensors").exists() and (folder / "model.pt").exists()


def _payload_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def smollm2(data: Path, store: ModelStore, log: Callable[[str], None]) -> Model:
    """The store's SmolLM2 (imported when missing) and safetensors / torch.save copies of it."""
    if not store.exists(SMOLLM2):
        log(f"importing {SMOLLM2} into {store.root} ...")
        import_model("smollm2", store)
    src = store.path(SMOLLM2)
    folder = data / "smollm2"
    ckpt_config = json.loads((src / "config.json").read_text())
    if not _ready(folder):
        log(f"writing safetensors and torch.save copies of {SMOLLM2} under {folder} ...")
        ckpt = load_checkpoint(src)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in ckpt.tensors.items():  # a tied lm_head is stored once, as HF does
            if t.data_ptr() in seen and ckpt_config.get("tie_word_embeddings"):
                continue
            seen.add(t.data_ptr())
            tensors[name] = t.clone()  # one storage per tensor, as in a user's state dict
        hf_config = {k: v for k, v in ckpt_config.items() if v is not None}
        hf_config["architectures"] = ["LlamaForCausalLM"]
        _write_peer_formats(folder, tensors, hf_config)
        del ckpt, tensors
    sd = torch.load(folder / "model.pt", map_location="meta", weights_only=True)
    return Model("smollm2", src, folder / "hf", folder / "model.pt",
                 sum(t.nbytes for t in sd.values()), torch.float32)


def _synthetic_config(target_gb: float) -> Any:
    from transformers import LlamaConfig

    def size(layers: int) -> int:
        c = LlamaConfig(**SYNTH_SHAPE, num_hidden_layers=layers, tie_word_embeddings=False)
        with torch.device("meta"):
            from transformers import LlamaForCausalLM

            m = LlamaForCausalLM(c)
        return sum(t.numel() for t in m.state_dict().values()) * SYNTH_DTYPE.itemsize

    base, per_layer = size(0), size(1) - size(0)
    layers = max(1, round((target_gb * 1e9 - base) / per_layer))
    return LlamaConfig(**SYNTH_SHAPE, num_hidden_layers=layers, tie_word_embeddings=False,
                       dtype=SYNTH_DTYPE, architectures=["LlamaForCausalLM"])


def synthetic(data: Path, target_gb: float, log: Callable[[str], None]) -> Model:
    """A random-weight Llama of about ``target_gb`` GB in all three formats (written once)."""
    from transformers import LlamaForCausalLM

    cfg = _synthetic_config(target_gb)
    folder = data / f"synthetic-llama-{cfg.num_hidden_layers}l-bf16"
    sllm_dir = folder / "sllm"
    if not (sllm_dir.exists() and _ready(folder)):
        log(f"writing a {cfg.num_hidden_layers}-layer random Llama under {folder} ...")
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        tensors = {k: torch.empty(s, dtype=SYNTH_DTYPE).normal_(0.0, 0.02, generator=gen)
                   for k, s in shapes.items()}  # ~7 s for 1.1B values; no module init
        hf_config = cfg.to_dict()
        if sllm_dir.exists():
            shutil.rmtree(sllm_dir)
        write_checkpoint(sllm_dir, tensors, config=hf_config, meta={
            "name": folder.name, "dtype": "bfloat16", "source": "bench.loading (random)",
            "format": "synthetic", "architecture": "LlamaForCausalLM"})
        _write_peer_formats(folder, tensors, hf_config)
        del tensors
    sd = torch.load(folder / "model.pt", map_location="meta", weights_only=True)
    return Model("synthetic", sllm_dir, folder / "hf", folder / "model.pt",
                 sum(t.nbytes for t in sd.values()), SYNTH_DTYPE)


# --- page cache and touching ---------------------------------------------------------------------


def _disk_read_bytes() -> int:
    """Bytes read so far from the machine's whole disks (``/proc/diskstats``)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and Path(f"/sys/block/{f[2]}").exists():
            total += int(f[5]) * 512
    return total


def _busy_cpu_seconds() -> float:
    """CPU seconds spent by everything on the machine so far (``/proc/stat``, not idle/iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(x) for x in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


FIO_READ_BYTES = [0]
"""Bytes fio read for this run (its reads are not this process's)."""


@dataclass
class Neighbours:
    """What other processes did to the machine while the benchmark ran: their disk reads and
    CPU time compete with the loads, so the output reports them."""

    wall: float
    disk: int
    cpu: float
    own_read: int
    own_cpu: float

    @staticmethod
    def now() -> Neighbours:
        t = os.times()
        return Neighbours(time.perf_counter(), _disk_read_bytes(), _busy_cpu_seconds(),
                          _own_read_bytes() + FIO_READ_BYTES[0],
                          t.user + t.system + t.children_user + t.children_system)

    def since(self, start: Neighbours) -> tuple[float, float, float]:
        """(seconds, bytes other processes read from disk, CPU seconds they used) since start."""
        wall = self.wall - start.wall
        disk = (self.disk - start.disk) - (self.own_read - start.own_read)
        cpu = (self.cpu - start.cpu) - (self.own_cpu - start.own_cpu)
        return wall, max(0.0, disk), max(0.0, cpu)


def touch(tensors: Iterable[torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every tensor (and its last byte), each storage range
    once: what it takes to make a lazily mapped tensor resident. Returns a checksum of the bytes,
    so the reads cannot be skipped."""
    acc = 0
    seen: set[tuple[int, int]] = set()
    for t in tensors:
        if t.numel() == 0 or (t.data_ptr(), t.nbytes) in seen:
            continue
        seen.add((t.data_ptr(), t.nbytes))
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        raw = flat.view(torch.uint8)
        acc += int(raw[::PAGE].sum()) + int(raw[-1])
    return acc


# --- loaders -------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What a loader returned: its tensors, where they came from, and how to give them back."""

    tensors: list[torch.Tensor]
    tier: str | None = None
    keep: Any = None
    release: Callable[[], None] = lambda: None


def load_native(m: Model, device: str = "cpu", pool: DramPool | None = None) -> Loaded:
    ckpt = load_checkpoint(m.sllm_dir, device=device, pool=pool)
    return Loaded(list(ckpt.tensors.values()), ckpt.tier, ckpt, ckpt.release)


def load_safetensors(m: Model, device: str) -> Loaded:
    from safetensors.torch import load_file

    return Loaded(list(load_file(str(m.st_file), device=device).values()))


def load_torch(m: Model, device: str) -> Loaded:
    sd = torch.load(m.pt_file, map_location=device, weights_only=True)
    return Loaded(list(sd.values()))


def load_from_pretrained(m: Model, device: str) -> Loaded:
    from transformers import AutoModelForCausalLM

    kw = {} if device == "cpu" else {"device_map": device}
    model = AutoModelForCausalLM.from_pretrained(m.hf_dir, dtype=m.dtype, **kw)
    return Loaded(list(model.state_dict().values()), keep=model)


def load_runai(m: Model, device: str) -> Loaded:
    from runai_model_streamer import SafetensorsStreamer

    tensors = []
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(m.st_file))
        for _, t in streamer.get_tensors():
            tensors.append(t if device == "cpu" else t.to(device))
    return Loaded(tensors)


def load_fastsafetensors(m: Model, device: str) -> Loaded:
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True)
    loader.add_filenames({0: [str(m.st_file)]})
    fb = loader.copy_files_to_device()
    tensors = [fb.get_tensor(k) for k in fb.key_to_rank_lidx]

    def close() -> None:
        fb.close()
        loader.close()

    return Loaded(tensors, keep=(fb, loader), release=close)


PEERS: dict[str, tuple[str, Callable[[Model, str], Loaded]]] = {
    # loader name -> (module that must import, load function)
    "safetensors": ("safetensors.torch", load_safetensors),
    "torch.load": ("torch", load_torch),
    "from_pretrained": ("transformers", load_from_pretrained),
    "runai-model-streamer": ("runai_model_streamer", load_runai),
    "fastsafetensors": ("fastsafetensors", load_fastsafetensors),
}


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Row:
    loader: str
    tier: str
    cache: str
    model: str
    nbytes: int
    runs: list[float] = field(default_factory=list)
    touches: list[float] = field(default_factory=list)
    note: str = ""
    limit: str = ""  # "fio", "memcpy" or "h2d"
    limit_bps: float = 0.0
    device: str = "cpu"

    @property
    def seconds(self) -> float | None:
        return median(self.runs) if self.runs else None

    @property
    def gbps(self) -> float | None:
        s = self.seconds
        return self.nbytes / s / 1e9 if s else None

    @property
    def pct(self) -> float | None:
        g = self.gbps
        return 100 * g * 1e9 / self.limit_bps if g and self.limit_bps else None

    def as_json(self) -> dict[str, Any]:
        r = lambda x: None if x is None else round(x, 4)
        return {
            "loader": self.loader, "tier": self.tier, "cache": self.cache, "model": self.model,
            "device": self.device, "bytes": self.nbytes, "seconds": r(self.seconds),
            "gbps": r(self.gbps),
            "limit": self.limit or None, "pct_of_limit": r(self.pct),
            "runs": [round(x, 4) for x in self.runs],
            "touch_seconds": r(median(self.touches)) if self.touches else None,
            "note": self.note,
        }


def timed(load: Callable[[], Loaded], device: str = "cpu") -> tuple[float, float, Loaded]:
    """(seconds until usable, of which touching, the loaded result). On a GPU the load is
    usable once the device has finished every copy: no touching, a synchronize."""
    t0 = time.perf_counter()
    out = load()
    t1 = time.perf_counter()
    if device == "cpu":
        touch(out.tensors)
    else:
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    return t2 - t0, (t2 - t1 if device == "cpu" else 0.0), out


def _time_once(row: Row, load: Callable[[], Loaded], cache: str) -> str | None:
    """One timed load added to ``row`` (the page cache dropped first for a cold row); the loaded
    data is freed again. Returns the tier the loader reported."""
    if cache == "cold":
        drop_caches()
    secs, touched, out = timed(load, row.device)
    row.runs.append(secs)
    row.touches.append(touched)
    tier = out.tier
    _free(out)
    return tier


def _free(out: Loaded | None) -> None:
    if out is not None:
        out.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_peer(name: str, module: str, fn: Callable[[Model, str], Loaded], m: Model,
                 caches: list[str], repeat: int, device: str = "cpu") -> list[Row]:
    """A peer's cold and warm rows; a peer that cannot import or fails keeps rows saying why."""
    rows = [Row(name, "ssd" if c == "cold" else "page-cache", c, m.name, m.nbytes, device=device)
            for c in caches]
    fn = partial(fn, device=device)
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        for row in rows:
            row.note = f"not available: {type(e).__name__}: {e}"
        return rows
    try:
        _free(fn(m))  # untimed: one-time code paths (lazy imports, first calls) are not loading
    except Exception as e:  # noqa: BLE001 - report the failure in the row, never a number
        for row in rows:
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return rows
    for cache, row in zip(caches, rows, strict=True):
        try:
            if cache == "warm":
                _free(fn(m))  # load once untimed: the files are now in the page cache
            for _ in range(repeat):
                _time_once(row, partial(fn, m), cache)
        except Exception as e:  # noqa: BLE001 - report the failure in the row, never a number
            row.runs, row.touches = [], []
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return rows


def _pool_budget(m: Model) -> int:
    return sum(align_up(f.size) for f in read_index(m.sllm_dir).files) + ALIGNMENT


def _evict(pool: DramPool) -> None:
    """Empty the pool through its public API: reserving all of it evicts every unused entry."""
    lease = pool.reserve("bench.loading: evict", pool.budget)
    if lease is None:
        raise RuntimeError("the DRAM pool could not be emptied: an entry is still in use")
    lease.abort()


def measure_native(m: Model, caches: list[str], repeat: int, device: str = "cpu") -> list[Row]:
    """sllm's loader: without a pool; through the pool when it does not hold the checkpoint
    (SSD tier); again on the pool (DRAM tier).

    The pool lives for the whole measurement, as an invoker's does, and is emptied before each
    SSD-tier load. Its first load, into memory nothing had been read into yet, is not in the rows
    but in their note: on this VM such a read is slower than into memory read into before."""
    rows = []
    _free(load_native(m, device))  # untimed: one-time code paths are not loading
    pool = DramPool(_pool_budget(m))  # allocated and pre-faulted outside the timing
    drop_caches()
    first, _, out = timed(partial(load_native, m, device, pool), device)
    _free(out)
    del out
    for cache in caches:
        nopool = Row("native_loader-nopool", "ssd", cache, m.name, m.nbytes, device=device)
        ssd = Row("native_loader", "ssd", cache, m.name, m.nbytes, device=device,
                  note=f"first load into a new pool (cold): {first:.3f} s")
        dram = Row("native_loader", "dram", cache, m.name, m.nbytes, device=device)
        rows += [ssd, dram, nopool]
        if cache == "warm":
            _free(load_native(m, device))
        for _ in range(repeat):
            _time_once(nopool, partial(load_native, m, device), cache)
        for _ in range(repeat):
            _evict(pool)
            for row in (ssd, dram):
                tier = _time_once(row, partial(load_native, m, device, pool), cache)
                if tier != row.tier:
                    row.note = f"load_checkpoint reported tier {tier!r}"
    del pool
    gc.collect()
    return rows


# --- limits --------------------------------------------------------------------------------------


FIO_VARIANTS = {
    # this machine's virtual disk scales with requests in flight, so deep queues are tried too
    "psync": ["--ioengine=psync"],
    "libaio iodepth=8": ["--ioengine=libaio", "--iodepth=8"],
    "libaio iodepth=32": ["--ioengine=libaio", "--iodepth=32"],
    "libaio iodepth=128": ["--ioengine=libaio", "--iodepth=128"],
    "psync numjobs=4": ["--ioengine=psync", "--numjobs=4", "--group_reporting"],
    # what runai-model-streamer does (io_uring, registered buffers, 64 requests in flight)
    "io_uring iodepth=64 fixedbufs": ["--ioengine=io_uring", "--iodepth=64", "--fixedbufs"],
    "io_uring iodepth=128 fixedbufs": ["--ioengine=io_uring", "--iodepth=128", "--fixedbufs"],
}


def _fio(files: list[Path], variant: list[str]) -> tuple[int, float]:
    """One fio run over ``files`` (one job per file, stonewalled); (bytes, seconds)."""
    cmd = ["fio", "--output-format=json", "--readonly"]
    jobs = "numjobs=4" in " ".join(variant)
    for i, f in enumerate(files):
        size = f.stat().st_size // (4 << 20) * (4 << 20) or f.stat().st_size
        part = size // 4 // (4 << 20) * (4 << 20) if jobs else size
        cmd += [f"--name=read{i}", f"--filename={f}", "--rw=read", "--direct=1", "--bs=4M",
                f"--size={part or size}", "--stonewall", *variant]
        if jobs and part:
            cmd.append(f"--offset_increment={part}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    report = json.loads(out[out.index("{"):])
    nbytes = sum(j["read"]["io_bytes"] for j in report["jobs"])
    FIO_READ_BYTES[0] += nbytes
    # a group's runtime is its elapsed time; groups ran one after another
    seconds = sum(j["read"]["runtime"] for j in report["jobs"]) / 1000
    return nbytes, seconds


PY_DIRECT_THREADS = (1, 4, 16)
"""Requests in flight tried by the Python O_DIRECT read that stands in for fio."""


def _python_direct_read(files: list[Path], threads: int = 1) -> tuple[int, float]:
    """Read ``files`` one after another with O_DIRECT in 4 MiB blocks, ``threads`` blocks in
    flight (thread t reads blocks t, t + threads, ...; ``os.preadv`` lets go of the GIL).
    Returns (bytes, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    block = 4 << 20

    def worker(fd: int, size: int, first: int) -> int:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        n = 0
        for off in range(first * block, size, threads * block):
            n += os.preadv(fd, [buf], off)
        return n

    total = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in files:
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            try:
                size = os.fstat(fd).st_size
                total += sum(pool.map(partial(worker, fd, size), range(threads)))
            finally:
                os.close(fd)
    return total, time.perf_counter() - t0


def ssd_limit(m: Model, repeat: int) -> Row:
    """Sequential O_DIRECT reads of the model's sllm data files: every fio variant once, then the
    fastest one again until it has ``repeat`` runs; the row is that variant's median (a median,
    like the loaders' rows, not a lucky best on a disk whose speed moves from run to run)."""
    files = [m.sllm_dir / f.name for f in read_index(m.sllm_dir).files]
    row = Row("limit", "ssd", "cold", m.name, sum(f.stat().st_size for f in files), limit="fio")
    if shutil.which("fio") is None:
        tries = {}
        for threads in PY_DIRECT_THREADS:
            drop_caches()
            tries[threads] = _python_direct_read(files, threads)
        best = max(tries, key=lambda k: tries[k][0] / tries[k][1])
        row.nbytes, first = tries[best]
        row.runs = [first]
        for _ in range(repeat - 1):
            drop_caches()
            row.runs.append(_python_direct_read(files, best)[1])
        tried = ", ".join(f"{k}: {n / s / 1e9:.2f}" for k, (n, s) in tries.items())
        row.note = (f"fio not installed: Python O_DIRECT read, 4 MiB blocks, {best} in flight "
                    f"(GB/s by requests in flight, one run each: {tried})")
        return row
    sweep: dict[str, tuple[int, float]] = {}
    failed = []
    for name, variant in FIO_VARIANTS.items():
        drop_caches()
        try:
            sweep[name] = _fio(files, variant)
        except (subprocess.CalledProcessError, ValueError, KeyError) as e:
            failed.append(f"{name} ({type(e).__name__})")
    sweep = {k: v for k, v in sweep.items() if v[1] > 0}
    if not sweep:
        row.note = "fio failed in every variant: " + ", ".join(failed)
        return row
    best = max(sweep, key=lambda k: sweep[k][0] / sweep[k][1])
    row.nbytes, first = sweep[best]
    row.runs = [first]
    for _ in range(repeat - 1):
        drop_caches()
        row.runs.append(_fio(files, FIO_VARIANTS[best])[1])
    tried = ", ".join(f"{k} {n / s / 1e9:.2f}" for k, (n, s) in sweep.items())
    row.note = f"fio --direct=1 --bs=4M --rw=read, {best} (GB/s, one run each: {tried})"
    if failed:
        row.note += "; failed: " + ", ".join(failed)
    return row


def dram_limit(m: Model) -> Row:
    """numpy.copyto between two pre-faulted arrays of the model's size, best of 3."""
    src = np.ones(m.nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)  # zeros_like writes it: both are faulted in
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        runs.append(time.perf_counter() - t0)
    del src, dst
    gc.collect()
    return Row("limit", "dram", "n/a", m.name, m.nbytes, [min(runs)], limit="memcpy",
               note="numpy.copyto, pre-faulted, best of 3")


def h2d_limit(m: Model, device: str) -> Row:
    """``Tensor.copy_`` of the model's bytes from page-locked host memory to ``device``, best
    of 3 (after one untimed copy): the host-to-device link's limit."""
    src = torch.ones(m.nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(m.nbytes, dtype=torch.uint8, device=device)
    runs = []
    for i in range(4):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        if i:
            runs.append(time.perf_counter() - t0)
    del src, dst
    _free(None)
    return Row("limit", "h2d", "n/a", m.name, m.nbytes, [min(runs)], limit="h2d", device=device,
               note="pinned host -> device copy_, best of 3")


# --- output --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row], header: list[str]) -> None:
    for line in header:
        print(line)
    print()
    print(f"{'model':<10} {'loader':<22} {'tier':<10} {'cache':<5} {'bytes':>9} {'seconds':>8} "
          f"{'GB/s':>7} {'% limit':>12}  note")
    for r in rows:
        pct = f"{r.pct:.0f}% {r.limit}" if r.pct is not None else ""
        print(f"{r.model:<10} {r.loader:<22} {r.tier:<10} {r.cache:<5} {r.nbytes / 1e6:>6.0f} MB "
              f"{_fmt(r.seconds, '.3f'):>8} {_fmt(r.gbps, '.2f'):>7} {pct:>12}  {r.note}")


def targets(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.loader != "native_loader" or r.pct is None:
            continue
        if r.tier == "ssd" and r.cache == "cold":
            out.append(f"target SSD tier >= 90% of {r.limit}, {r.model}: {r.pct:.0f}% "
                       f"({'met' if r.pct >= 90 else 'NOT met'})")
        if r.tier == "dram":
            out.append(f"target DRAM tier >= 80% of {r.limit}, {r.model} ({r.cache}): "
                       f"{r.pct:.0f}% ({'met' if r.pct >= 80 else 'NOT met'})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loading", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,synthetic",
                    help="comma-separated: smollm2, synthetic")
    ap.add_argument("--synthetic-gb", type=float, default=2.2, help="size of the synthetic Llama")
    ap.add_argument("--repeat", type=int, default=3, help="timed loads per row (median reported)")
    ap.add_argument("--data", type=Path, default=None,
                    help="where the bench files are kept (default $SLLM_HOME/bench-data)")
    ap.add_argument("--skip-peers", action="store_true", help="only sllm's loader and the limits")
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    ap.add_argument("--device", default="cpu", help="where the weights go: cpu or cuda:N")
    args = ap.parse_args()
    device = args.device
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        sys.exit(f"--device {device}: only cpu, or cuda:N where torch sees a GPU")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - {"smollm2", "synthetic"}
    if unknown:
        sys.exit(f"unknown model(s): {', '.join(sorted(unknown))}")
    data = args.data or config.sllm_home() / "bench-data"
    data.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)

    models = []
    for n in names:
        models.append(smollm2(data, ModelStore(config.store_root()), log) if n == "smollm2"
                      else synthetic(data, args.synthetic_gb, log))
    can_drop = drop_caches()
    caches = ["cold", "warm"] if can_drop else ["warm"]
    if not args.skip_peers:  # imports are not part of any loader's time
        for module, _ in PEERS.values():
            try:
                __import__(module)
            except Exception:  # noqa: BLE001, S110 - reported in the row
                pass
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass

    rows: list[Row] = []
    start = Neighbours.now()
    for m in models:
        log(f"{m.name}: limits ...")
        fio, memcpy = ssd_limit(m, args.repeat), dram_limit(m)
        model_rows = [fio, memcpy]
        from_memory, from_ssd = memcpy, fio
        if device != "cpu":
            h2d = h2d_limit(m, device)
            model_rows.append(h2d)
            from_memory = h2d
            from_ssd = min(fio, h2d, key=lambda r: r.gbps or float("inf"))
        log(f"{m.name}: native_loader ...")
        model_rows += measure_native(m, caches, args.repeat, device)
        if not args.skip_peers:
            for name, (module, fn) in PEERS.items():
                log(f"{m.name}: {name} ...")
                model_rows += measure_peer(name, module, fn, m, caches, args.repeat, device)
        for r in model_rows:
            if r.loader != "limit":
                ref = from_ssd if r.tier == "ssd" else from_memory
                r.limit, r.limit_bps = ref.limit, (ref.gbps or 0) * 1e9
            else:
                r.limit_bps = (r.gbps or 0) * 1e9
        rows += model_rows
    wall, other_disk, other_cpu = Neighbours.now().since(start)
    cpus = os.cpu_count() or 1
    busy = other_disk > 0.05 * sum(r.nbytes for r in rows) or other_cpu > 0.1 * wall * cpus

    engine = ("C++ engine, O_DIRECT" if native_loader.NATIVE
              else "pure-Python twin (buffered preadv: the C++ engine is not built)")
    mem = memory_bytes() / 2**30
    header = [
        f"machine: {os.cpu_count()} CPUs, {mem:.1f} GiB memory; torch {torch.__version__}",
        f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device != "cpu"
                               else ""),
        f"native_loader engine: {engine}",
        "page cache: dropped before each cold load" if can_drop
        else "page cache: could NOT be dropped (needs root): cold rows left out",
        f"seconds: median of {args.repeat}; every row includes "
        + ("touching one byte per 4 KiB page" if device == "cpu" else "torch.cuda.synchronize()"),
        f"other processes during the {wall:.0f} s run: {other_disk / 1e9:.1f} GB read from "
        f"disk, {other_cpu:.0f} CPU-seconds ({100 * other_cpu / (wall * cpus):.0f}% of the "
        f"machine)" + ("  BUSY: the figures are lower than on a quiet machine" if busy else ""),
    ]
    if args.json:  # the rows on stdout, what qualifies them on stderr
        for line in header:
            log(line)
        for r in rows:
            print(json.dumps(r.as_json()))
        return
    print_table(rows, header)
    print()
    for line in targets(rows):
        print(line)


if __name__ == "__main__":
    main()
