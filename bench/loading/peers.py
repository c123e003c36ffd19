"""The loaders a user would pick instead of sllm's, each called the documented way, and their
rows: ``safetensors.torch.load_file``, ``torch.load`` (non-mmap), ``from_pretrained``,
runai-model-streamer's ``SafetensorsStreamer`` and fastsafetensors' ``SafeTensorsFileLoader``
(CPU / no-GDS path). On a GPU their tensors end on the device: through the loader's own device
argument where it has one, else with ``.to(device)``.

A peer that cannot be imported or fails keeps its rows, with the reason and no figure.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from bench.loading.models import Model
from bench.loading.row import Row
from bench.loading.timing import Loaded, free, time_once


def load_safetensors(m: Model, device: str) -> Loaded:
    """``safetensors.torch.load_file(file, device=device)``."""
    from safetensors.torch import load_file

    return Loaded(list(load_file(str(m.st_file), device=device).values()))


def load_torch(m: Model, device: str) -> Loaded:
    """``torch.load(file, map_location=device, weights_only=True)``."""
    sd = torch.load(m.pt_file, map_location=device, weights_only=True)
    return Loaded(list(sd.values()))


def load_from_pretrained(m: Model, device: str) -> Loaded:
    """``AutoModelForCausalLM.from_pretrained`` in the checkpoint's dtype (``device_map`` off
    the CPU); the model is kept alive with its state dict's tensors."""
    from transformers import AutoModelForCausalLM

    kw = {} if device == "cpu" else {"device_map": device}
    model = AutoModelForCausalLM.from_pretrained(m.hf_dir, dtype=m.dtype, **kw)
    return Loaded(list(model.state_dict().values()), keep=model)


def load_runai(m: Model, device: str) -> Loaded:
    """``SafetensorsStreamer().stream_file(file)``, then every tensor of ``get_tensors()``
    (owned tensors, default concurrency and memory limit)."""
    from runai_model_streamer import SafetensorsStreamer

    tensors: list[torch.Tensor] = []
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(m.st_file))
        for _, t in streamer.get_tensors():
            tensors.append(t if device == "cpu" else t.to(device))
    return Loaded(tensors)


def load_fastsafetensors(m: Model, device: str) -> Loaded:
    """``SafeTensorsFileLoader(SingleGroup(), device, nogds=True)``, ``add_filenames``,
    ``copy_files_to_device()``, then ``get_tensor`` of every key; released by closing both."""
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


def import_peers() -> None:
    """Import every peer's module that imports, and quiet transformers' progress bars, before
    any timing: imports are not part of any loader's time."""
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


def _failed(e: Exception) -> str:
    """A row's note for a peer that raised ``e``: its type and first line (200 characters)."""
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def measure_peer(name: str, module: str, fn: Callable[[Model, str], Loaded], m: Model,
                 caches: list[str], repeat: int, device: str = "cpu") -> list[Row]:
    """A peer's cold and warm rows; a peer that cannot import or fails keeps rows saying why."""
    rows = [Row(name, "ssd" if c == "cold" else "page-cache", c, m.name, m.nbytes, device=device)
            for c in caches]

    def load(model: Model) -> Loaded:
        """The peer's load of ``model`` onto ``device``."""
        return fn(model, device)

    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        for row in rows:
            row.note = f"not available: {type(e).__name__}: {e}"
        return rows
    try:
        free(load(m))  # untimed: one-time code paths (lazy imports, first calls) are not loading
    except Exception as e:  # noqa: BLE001 - report the failure in the row, never a number
        for row in rows:
            row.note = _failed(e)
        return rows
    for cache, row in zip(caches, rows, strict=True):
        try:
            if cache == "warm":
                free(load(m))  # load once untimed: the files are now in the page cache
            for _ in range(repeat):
                time_once(row, partial(load, m), cache)
        except Exception as e:  # noqa: BLE001 - report the failure in the row, never a number
            row.runs, row.touches = [], []
            row.note = _failed(e)
    return rows
