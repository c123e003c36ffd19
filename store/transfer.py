"""Fetching a checkpoint from a peer invoker or from the origin store: resumable, checksummed.

When the controller places an instance on an invoker without a copy of the model, the invoker
calls :func:`fetch_checkpoint` (blocking: run it in a thread) with the places that have one, in
order of preference:

- a peer invoker's base URL (``"http://10.0.0.7:8081"``), read through its checkpoint file API
  (:mod:`store.files_api`): ``GET /v1/checkpoints/<model>`` lists the files with their sizes
  and the sha256 of ``index.json``; ``GET /v1/checkpoints/<model>/files/<path>`` serves one file
  and honours ``Range``;
- a :class:`~pathlib.Path`: the root of the origin store (a model store mounted on every node),
  read from ``<path>/<model>/``.

For each source in turn:

1. Read its file list and its ``index.json``; a peer's index must hash to the sha256 it listed.
   If the local store holds the model with the same index bytes, stop: nothing moves.
2. Partial data lives in ``<store>/.partial-<model>/`` (:meth:`ModelStore.partial_dir`) and
   survives failures and cancellation. It keeps the index it is being filled for; when that is
   not this source's index the folder is wiped (another version), otherwise each file in it is
   continued from its current size.
3. Fetch the rest of every file (``Range: bytes=N-`` from a peer, a seek in a folder), written
   with buffered I/O in pieces of ``chunk_bytes`` and fsynced. A data file must then match the
   index: its size and every chunk's xxh3-64 checksum
   (:func:`~store.checkpoint.loader.verify_data_file`); any other file (config, tokenizer) must
   have the listed size. A file that fails is deleted and fetched once more from the start; when
   it fails again the source is given up.
4. Move the complete folder to a staging folder and commit it (replacing a stale local copy), so
   the model's name never points at half a checkpoint.

A source that fails (unreachable, does not have the model, corrupt data) is logged and the next
one is tried, continuing the partial data when its index is the same.

Worked example: ``data-00000.bin`` (1 GiB) is half fetched from peer A when A dies; the partial
folder holds A's index and the first 512 MiB. The origin folder comes next: its index has the
same bytes, so the copy seeks to 512 MiB and copies the rest, the file is verified, the folder
committed; the result has ``nbytes`` = the whole checkpoint and ``transferred`` = 512 MiB plus the
config and tokenizer files.

One fetch of a model runs at a time per store: another one (thread or process) waits on the lock
file ``<store>/.partial-<model>.lock``, then finds the model in place and returns at once.

One module: the two kinds of source (a peer over HTTP, a folder) share every step above, the
resumable partial folder and the checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import httpx
from pydantic import ValidationError

from sllm.errors import (
    CheckpointError,
    InvalidRequest,
    InvokerError,
    ModelNotFound,
    NotFound,
    SllmError,
    Unavailable,
)
from sllm.http import raise_for_error
from sllm.messages import CheckpointListing
from sllm.routes import Invoker, path
from store.checkpoint.format import INDEX_NAME, DataFile
from store.checkpoint.loader import read_index, verify_data_file
from store.checkpoint.writer import fsync_dir
from store.files_api import check_relpath, checkpoint_files, index_sha256, resolve_file
from store.model_store import ModelStore, validate_name

logger = logging.getLogger(__name__)

HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
"""Timeouts (seconds) of the client made when none is passed; a stalled peer fails after 30 s."""
_LOCK_POLL_S = 0.05


@dataclass(frozen=True)
class TransferResult:
    """What :func:`fetch_checkpoint` did.

    Attributes:
        model: the model's name.
        source: the peer URL or origin folder it came from.
        nbytes: bytes of the whole checkpoint (every file, ``index.json`` included).
        transferred: bytes written into the local store this time: less than ``nbytes`` when a
            partial fetch was continued, 0 when the local copy was up to date, more when a
            corrupt file had to be fetched again.
        seconds: wall time of the call.
    """

    model: str
    source: str
    nbytes: int
    transferred: int
    seconds: float


def fetch_checkpoint(
    model: str,
    store: ModelStore,
    sources: Sequence[str | Path],
    *,
    client: httpx.Client | None = None,
    chunk_bytes: int = 8 << 20,
    cancel: threading.Event | None = None,
    rate_bps: float | None = None,
) -> TransferResult:
    """Bring the checkpoint of ``model`` into ``store`` from the first source that has a good
    copy (see the module docstring). Blocking: the invoker runs it in a thread.

    Args:
        model: the model's name.
        store: the local model store.
        sources: in order of preference, peer invokers' base URLs (``str`` starting with
            ``http``) and origin store roots (``Path``, holding ``<path>/<model>/``).
        client: the HTTP client for peers (a new one with :data:`HTTP_TIMEOUT` when None).
        chunk_bytes: bytes per write (and per read from a folder).
        cancel: when set, the fetch stops at the next piece, keeps its partial data and raises.
        rate_bps: at most this many bytes per second are written (an emulated network link,
            for benchmarks on one machine: a store root that stands for a remote object store);
            None: as fast as the source and the disk go.

    Returns:
        Where the checkpoint came from and how many bytes moved.

    Raises:
        InvalidRequest: a bad model name, or a source that is neither an http URL nor a Path.
        CheckpointError: no source gave a good copy, and one served corrupt data.
        ModelNotFound: every source said it does not have the model (or there was no source).
        Unavailable: no source gave a good copy and some could not be reached or read; or
            ``cancel`` was set.
        Conflict: the model was written into the store by someone else meanwhile.
        OSError: the local store cannot be written (disk full, ...).
    """
    validate_name(model)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    for s in sources:
        if not isinstance(s, Path) and not (isinstance(s, str) and s.startswith("http")):
            raise InvalidRequest(f"checkpoint source {s!r} is neither an http URL nor a Path",
                                 param="sources")
    start = time.perf_counter()
    http = client if client is not None else httpx.Client(timeout=HTTP_TIMEOUT)
    if rate_bps is not None and rate_bps <= 0:
        raise ValueError(f"rate_bps must be positive, not {rate_bps}")
    job = _Fetch(model, store, store.partial_dir(model), chunk_bytes, cancel, rate_bps)
    try:
        with _exclusive(job.partial, cancel):
            failures: list[tuple[str, SllmError]] = []
            for s in sources:
                origin: _Origin = (
                    _Peer(s, model, http) if isinstance(s, str) else _Folder(s, model, chunk_bytes)
                )
                try:
                    nbytes, moved, fresh = job.run(origin)
                except SllmError as e:
                    if cancel is not None and cancel.is_set():
                        raise Unavailable(f"fetch of model {model!r} cancelled") from e
                    logger.warning("fetching model %s from %s failed: %s", model, origin.label,
                                   e.message)
                    failures.append((origin.label, e))
                    continue
                if fresh:
                    job.commit()
                seconds = time.perf_counter() - start
                logger.info("fetched model %s from %s: %d of %d bytes moved in %.2f s", model,
                            origin.label, moved, nbytes, seconds)
                return TransferResult(model, origin.label, nbytes, moved, seconds)
            raise _all_failed(model, failures)
    finally:
        if client is None:
            http.close()


@dataclass(frozen=True)
class _Listing:
    """A source's copy: relative path -> size in bytes of each file, and its index's bytes."""

    files: dict[str, int]
    index: bytes


class _Origin(Protocol):
    label: str

    def listing(self) -> _Listing:
        """The source's files and index. Raises ModelNotFound, Unavailable, CheckpointError."""

    def copy(self, name: str, out: BinaryIO, offset: int, cancel: threading.Event | None) -> int:
        """Append the bytes of file ``name`` from ``offset`` on to ``out`` (opened for appending,
        holding ``offset`` bytes; emptied first if the source can only send the whole file).
        Returns the bytes written. Raises Unavailable (unreachable, or cancelled),
        ModelNotFound, CheckpointError, InvokerError."""


class _Peer:
    """A peer invoker's checkpoint file API."""

    def __init__(self, base_url: str, model: str, client: httpx.Client) -> None:
        self.label = base_url
        self._root = base_url.rstrip("/")
        self._model = model
        self._client = client

    def listing(self) -> _Listing:
        with self._errors():
            r = self._client.get(self._root + path(Invoker.CHECKPOINT, model=self._model))
            raise_for_error(r)
            try:
                body = CheckpointListing.model_validate_json(r.content)
            except ValidationError as e:
                raise InvokerError(f"malformed checkpoint listing: {e}") from e
            r = self._client.get(self._url(INDEX_NAME), headers={"Accept-Encoding": "identity"})
            raise_for_error(r)
        if hashlib.sha256(r.content).hexdigest() != body.index_sha256:
            raise CheckpointError(f"{INDEX_NAME} does not match the listed sha256")
        try:
            files = {check_relpath(f.name): f.size for f in body.files}
        except InvalidRequest as e:
            raise InvokerError(f"unsafe file path in the listing: {e.message}") from e
        return _Listing(files, r.content)

    def copy(self, name: str, out: BinaryIO, offset: int, cancel: threading.Event | None) -> int:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        n = 0
        with self._errors(), self._client.stream("GET", self._url(name), headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                raise_for_error(r)
            if offset and r.status_code != 206:  # the whole file came back: start over
                out.seek(0)
                out.truncate()
            elif offset and not r.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                raise CheckpointError(f"{name}: asked for bytes {offset}- and got "
                                      f"{r.headers.get('content-range')!r}")
            for piece in r.iter_bytes():
                _check_cancel(cancel)
                out.write(piece)
                n += len(piece)
        return n

    def _url(self, name: str) -> str:
        return self._root + path(Invoker.CHECKPOINT_FILE, model=self._model, path=name)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as e:
            raise Unavailable(f"unreachable: {type(e).__name__}: {e}") from e


class _Folder:
    """A checkpoint folder ``<root>/<model>/`` of the origin store."""

    def __init__(self, root: Path, model: str, chunk_bytes: int) -> None:
        self.label = str(root)
        self._folder = Path(root) / model
        self._chunk_bytes = chunk_bytes

    def listing(self) -> _Listing:
        try:
            index = (self._folder / INDEX_NAME).read_bytes()
            files = {f.name: f.size for f in checkpoint_files(self._folder)}
        except FileNotFoundError:
            raise ModelNotFound(f"{self._folder}: no checkpoint there", param="model") from None
        except OSError as e:
            raise Unavailable(f"{self._folder}: cannot read: {e}") from e
        return _Listing(files, index)

    def copy(self, name: str, out: BinaryIO, offset: int, cancel: threading.Event | None) -> int:
        buf = memoryview(bytearray(self._chunk_bytes))
        n = 0
        try:
            src = open(resolve_file(self._folder, name), "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise Unavailable(f"{self._folder / name}: cannot read: {e}") from e
        with src:
            src.seek(offset)
            while True:
                _check_cancel(cancel)
                try:
                    k = src.readinto(buf)
                except OSError as e:
                    raise Unavailable(f"{self._folder / name}: cannot read: {e}") from e
                if not k:
                    return n
                out.write(buf[:k])
                n += k


@dataclass(frozen=True)
class _Fetch:
    """One fetch of ``model`` into ``store`` through the partial folder ``partial``."""

    model: str
    store: ModelStore
    partial: Path
    chunk_bytes: int
    cancel: threading.Event | None
    rate_bps: float | None = None

    def run(self, origin: _Origin) -> tuple[int, int, bool]:
        """Fill the partial folder from ``origin``. Returns the checkpoint's bytes, the bytes
        written, and whether the partial folder is to be committed (False: the local copy was
        up to date). Raises what the source raises, CheckpointError for corrupt data."""
        _check_cancel(self.cancel)
        listing = origin.listing()
        nbytes = sum(listing.files.values())
        if listing.files.get(INDEX_NAME) != len(listing.index):
            raise CheckpointError(f"{INDEX_NAME} changed while it was read")
        sha = hashlib.sha256(listing.index).hexdigest()
        if self._local_sha() == sha:
            logger.info("model %s is up to date with %s", self.model, origin.label)
            return nbytes, 0, False
        moved = self._start(listing.index, sha)
        index = read_index(self.partial)
        data = {f.name: f for f in index.files}
        for f in index.files:
            if listing.files.get(f.name) != f.size:
                raise CheckpointError(f"{f.name} is listed with "
                                      f"{listing.files.get(f.name)} bytes, the index says {f.size}")
        for name, size in sorted(listing.files.items()):
            if name != INDEX_NAME:
                moved += self._file(origin, name, size, data.get(name))
        self._drop_others(listing.files)
        return nbytes, moved, True

    def commit(self) -> None:
        """Commit the complete partial folder as the model (replacing a stale copy)."""
        for dirpath, _, _ in os.walk(self.partial):
            fsync_dir(Path(dirpath))
        staging = self.store.stage(self.model, self.partial)
        try:
            self.store.commit(self.model, staging, replace=self.store.exists(self.model))
        except BaseException:
            with contextlib.suppress(OSError):  # keep the data for the next attempt
                os.rename(staging, self.partial)
            raise

    def _local_sha(self) -> str | None:
        if not self.store.exists(self.model):
            return None
        try:
            return index_sha256(self.store.path(self.model))
        except SllmError:
            return None  # gone or unreadable: replace it

    def _start(self, index: bytes, sha: str) -> int:
        """Keep the partial folder if it is for the index ``index``; otherwise start it afresh
        with that index. Returns the bytes written."""
        with contextlib.suppress(SllmError):
            if index_sha256(self.partial) == sha:
                logger.info("continuing the partial fetch of model %s", self.model)
                return 0
        if self.partial.exists():
            logger.info("wiping the partial fetch of model %s: another version", self.model)
            shutil.rmtree(self.partial)
        self.partial.mkdir()
        with open(self.partial / INDEX_NAME, "wb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        return len(index)

    def _file(self, origin: _Origin, name: str, size: int, entry: DataFile | None) -> int:
        """Complete and verify one file (twice at most). Returns the bytes written."""
        path = self.partial / name
        path.parent.mkdir(parents=True, exist_ok=True)
        moved = 0
        for attempt in (1, 2):
            have = path.stat().st_size if path.exists() else 0
            if have > size:  # not a prefix of this file
                path.unlink()
                have = 0
            if have < size:
                logger.debug("fetching %s of model %s from %s at byte %d", name, self.model,
                             origin.label, have)
                with open(path, "ab", buffering=self.chunk_bytes) as out:
                    sink = (out if self.rate_bps is None
                            else _Paced(out, self.rate_bps, self.cancel))
                    moved += origin.copy(name, sink, have, self.cancel)  # type: ignore[arg-type]
                    out.flush()
                    os.fsync(out.fileno())
            try:
                self._verify(name, size, entry)
                return moved
            except CheckpointError as e:
                path.unlink(missing_ok=True)
                if attempt == 2:
                    raise CheckpointError(f"{name} failed verification twice: {e.message}") from e
                logger.warning("%s of model %s from %s failed verification, fetching it again: %s",
                               name, self.model, origin.label, e.message)
        raise AssertionError("unreachable")

    def _verify(self, name: str, size: int, entry: DataFile | None) -> None:
        if entry is not None:
            verify_data_file(self.partial, entry)
            return
        path = self.partial / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            raise CheckpointError(f"{path}: {actual} bytes, the source listed {size}")

    def _drop_others(self, files: dict[str, int]) -> None:
        """Delete files of the partial folder that the source does not have."""
        for dirpath, _, filenames in os.walk(self.partial):
            for filename in filenames:
                path = Path(dirpath) / filename
                if path.relative_to(self.partial).as_posix() not in files:
                    path.unlink()


class _Paced:
    """Writes to ``out`` at most ``bps`` bytes per second on average (sleeping after a write
    that got ahead, until ``cancel`` is set): an emulated network link."""

    def __init__(self, out: BinaryIO, bps: float, cancel: threading.Event | None) -> None:
        self._out, self._bps = out, bps
        self._cancel = cancel or threading.Event()
        self._t0, self._written = time.monotonic(), 0

    def write(self, data: bytes | memoryview) -> int:
        n = self._out.write(data)
        self._written += len(data)
        ahead = self._written / self._bps - (time.monotonic() - self._t0)
        if ahead > 0:
            self._cancel.wait(ahead)
        return n


@contextlib.contextmanager
def _exclusive(partial: Path, cancel: threading.Event | None) -> Iterator[None]:
    """Hold an exclusive lock on ``<partial>.lock``, polling ``cancel`` while another fetch of
    the same model (any thread or process) holds it."""
    with open(partial.with_name(partial.name + ".lock"), "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                _check_cancel(cancel)
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Unavailable("checkpoint transfer cancelled")


def _all_failed(model: str, failures: list[tuple[str, SllmError]]) -> SllmError:
    """The error when no source gave a good copy: CheckpointError if one served corrupt data,
    ModelNotFound if all said they do not have it, Unavailable otherwise."""
    if not failures:
        return ModelNotFound(f"model {model!r}: no source to fetch it from", param="model")
    detail = "; ".join(f"{label}: {e.message}" for label, e in failures)
    message = f"cannot fetch model {model!r}: {detail}"
    if any(isinstance(e, CheckpointError) for _, e in failures):
        return CheckpointError(message)
    if all(isinstance(e, NotFound) for _, e in failures):
        return ModelNotFound(message, param="model")
    return Unavailable(message)
