"""The model store: a folder of named checkpoints on this node's disk.

Layout: ``<root>/<name>/`` is a complete checkpoint (it has ``index.json``). New checkpoints are
written into ``<root>/.staging-<name>-<random>/`` and renamed into place by
:meth:`ModelStore.commit`, so a name never points at half a model; staging leftovers (dot
folders) and folders without an index are never listed. A checkpoint fetched from another node
(:mod:`store.transfer`) collects its files in ``<root>/.partial-<name>/`` across attempts and is
moved to a staging folder (:meth:`ModelStore.stage`) once complete.

Model names: lowercase letters, digits, ``-``, ``.`` and ``_``, starting with a letter or digit,
at most 63 characters.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sllm.errors import CheckpointError, Conflict, InvalidRequest, ModelNotFound
from store.checkpoint.format import INDEX_NAME
from store.checkpoint.loader import read_index
from store.checkpoint.writer import fsync_dir

logger = logging.getLogger(__name__)

MAX_NAME_LEN = 63
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
_PARTIAL_PREFIX = ".partial-"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name.

    Raises:
        InvalidRequest: it is not (the message gives the rule).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid model name {name!r}: use 1-{MAX_NAME_LEN} lowercase letters, digits, "
            "'-', '.' or '_', starting with a letter or digit",
            param="name",
        )
    return name


def sanitize_name(raw: str) -> str:
    """A valid model name made from ``raw`` (a folder name or file stem): lowercased, other
    characters turned into ``-``, leading punctuation dropped, cut to 63 characters.

    Raises:
        InvalidRequest: nothing usable is left.
    """
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).lstrip("._-")[:MAX_NAME_LEN]
    if not name:
        raise InvalidRequest(f"cannot make a model name from {raw!r}; pass a name", param="name")
    return validate_name(name)


@dataclass(frozen=True)
class ModelInfo:
    """One model in the store.

    Attributes:
        name: the model's name.
        path: its checkpoint folder.
        nbytes: bytes of tensor data (all data files).
        dtype: the dtype holding most of its bytes (``"bfloat16"``, ...).
        source: where it was imported from.
        created: unix seconds when it was written.
        num_tensors: tensors in its index.
    """

    name: str
    path: Path
    nbytes: int
    dtype: str
    source: str
    created: float
    num_tensors: int


class ModelStore:
    """Named checkpoints under one root folder (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        """Whether a complete model named ``name`` is in the store. Raises InvalidRequest."""
        return (self.root / validate_name(name) / INDEX_NAME).is_file()

    def path(self, name: str) -> Path:
        """The checkpoint folder of ``name``. Raises ModelNotFound, InvalidRequest."""
        if not self.exists(name):
            raise ModelNotFound(f"model {name!r} is not in the store {self.root}", param="model")
        return self.root / name

    def get(self, name: str) -> ModelInfo:
        """What the store knows of ``name``.

        Raises:
            ModelNotFound: no such model. InvalidRequest: a bad name.
            CheckpointError: its index is unreadable.
        """
        path = self.path(name)
        index = read_index(path)
        meta = index.meta
        created = meta.get("created")
        return ModelInfo(
            name=name,
            path=path,
            nbytes=index.total_bytes,
            dtype=str(meta.get("dtype", "")),
            source=str(meta.get("source", "")),
            created=float(created) if isinstance(created, int | float) else path.stat().st_mtime,
            num_tensors=len(index.tensors),
        )

    def list(self) -> list[ModelInfo]:
        """Every complete model, sorted by name; staging folders, folders without an index and
        models whose index is unreadable (logged) are skipped."""
        out: list[ModelInfo] = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or not _NAME.fullmatch(entry.name):
                continue
            if not (entry / INDEX_NAME).is_file():
                continue
            try:
                out.append(self.get(entry.name))
            except CheckpointError as e:
                logger.warning("skipping model %s: %s", entry.name, e)
        return out

    def remove(self, name: str) -> None:
        """Delete ``name`` (renamed aside first, so it vanishes at once). Raises ModelNotFound."""
        path = self.path(name)
        trash = self.root / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("removed model %s", name)

    def staging_dir(self, name: str) -> Path:
        """A new empty folder in the store to write model ``name`` into before :meth:`commit`.

        Raises:
            InvalidRequest: a bad name.
        """
        path = self.root / f"{_STAGING_PREFIX}{validate_name(name)}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def partial_dir(self, name: str) -> Path:
        """Where a transfer of ``name`` keeps partial data between attempts:
        ``<root>/.partial-<name>/``, the same path every time so a later attempt resumes (a dot
        folder: never listed). Not created here.

        Raises:
            InvalidRequest: a bad name.
        """
        return self.root / f"{_PARTIAL_PREFIX}{validate_name(name)}"

    def stage(self, name: str, folder: Path) -> Path:
        """Move ``folder``, a complete checkpoint in a dot folder directly under the root (a
        :meth:`partial_dir`), to a new staging folder of ``name`` and return it, for
        :meth:`commit` or :meth:`discard`.

        Raises:
            InvalidRequest: a bad name, or ``folder`` is not a dot folder directly under the root.
        """
        folder = Path(folder)
        if folder.parent != self.root or not folder.name.startswith("."):
            raise InvalidRequest(f"{folder} is not a dot folder of the store {self.root}")
        path = self.root / f"{_STAGING_PREFIX}{validate_name(name)}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, path)
        return path

    def discard(self, staging: Path) -> None:
        """Delete a staging folder (after a failed write)."""
        self._check_staging(staging)
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, name: str, staging: Path, *, replace: bool = False) -> ModelInfo:
        """Rename a fully written staging folder into place as ``name``.

        Args:
            name: the model name.
            staging: a folder from :meth:`staging_dir` holding a complete checkpoint.
            replace: swap out an existing model of that name instead of failing.

        Raises:
            Conflict: ``name`` exists and ``replace`` is false.
            InvalidRequest: a bad name, or ``staging`` is not a staging folder of this store.
            CheckpointError: ``staging`` holds no valid index.
        """
        dest = self.root / validate_name(name)
        self._check_staging(staging)
        read_index(staging)
        fsync_dir(staging)
        old: Path | None = None
        if dest.exists():
            if not replace:
                raise Conflict(f"model {name!r} already exists in the store", param="name")
            old = self.root / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        try:
            os.rename(staging, dest)
        except OSError as e:
            # Another writer got there between the check and the rename.
            raise Conflict(f"model {name!r} already exists in the store: {e}") from e
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("stored model %s", name)
        return self.get(name)

    def _check_staging(self, staging: Path) -> None:
        staging = Path(staging)
        if staging.parent != self.root or not staging.name.startswith(_STAGING_PREFIX):
            raise InvalidRequest(f"{staging} is not a staging folder of the store {self.root}")
