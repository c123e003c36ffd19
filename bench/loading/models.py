"""The checkpoints the loaders read: one model's weights stored once in each loader's format (an
sllm checkpoint, ``hf/model.safetensors`` with ``hf/config.json``, and ``model.pt``), written
under the bench data folder the first time and reused after.

- :func:`smollm2`: the model store's SmolLM2-135M-Instruct, float32 (538 MB; imported when
  missing); its sllm checkpoint is the store's own, its tied ``lm_head.weight`` stored once;
- :func:`synthetic`: a random-weight bfloat16 Llama of the shape :data:`SYNTH_SHAPE` with as many
  layers as make the requested size (22 layers for 2.2 GB, the shape of TinyLlama-1.1B).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from store.checkpoint import load_checkpoint, write_checkpoint
from store.importer import import_model
from store.model_store import ModelStore

SMOLLM2 = "smollm2-135m-instruct"
"""SmolLM2's name in the model store."""
SYNTH_SHAPE: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
}
"""The synthetic Llama's shape, all but its number of layers (TinyLlama-1.1B's)."""
SYNTH_DTYPE = torch.bfloat16


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
        """The safetensors file of :attr:`hf_dir`."""
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
    """Whether ``folder`` holds both peer formats (each is renamed into place once complete)."""
    return (folder / "hf" / "model.safetensors").exists() and (folder / "model.pt").exists()


def _weight_bytes(pt_file: Path) -> int:
    """The weight bytes of the state dict in ``pt_file``, read as meta tensors (no data)."""
    sd = torch.load(pt_file, map_location="meta", weights_only=True)
    return sum(t.nbytes for t in sd.values())


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
    return Model("smollm2", src, folder / "hf", folder / "model.pt",
                 _weight_bytes(folder / "model.pt"), torch.float32)


def _synthetic_config(target_gb: float) -> Any:
    """The ``LlamaConfig`` of :data:`SYNTH_SHAPE` whose weights come nearest ``target_gb`` GB
    (1e9 bytes; at least one layer)."""
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
    return Model("synthetic", sllm_dir, folder / "hf", folder / "model.pt",
                 _weight_bytes(folder / "model.pt"), SYNTH_DTYPE)
