"""The checkpoint file API: an invoker serves the checkpoints of its model store to its peers.

::

    GET /v1/checkpoints/{model}               CheckpointListing: every regular file of the
                                              checkpoint folder (relative posix path, size in
                                              bytes) and the sha256 hex of its index.json
    GET /v1/checkpoints/{model}/files/{path}  the file's bytes; honours ``Range: bytes=N-``
                                              (206 with Content-Range), so a fetch can resume

The client is :func:`store.transfer.fetch_checkpoint`. File bytes are streamed by starlette's
``FileResponse``, which reads in a worker thread; the listing, hashing and path checks run in a
thread as well, so the event loop never waits on the disk.

Errors (mapped to responses by :data:`sllm.http.EXCEPTION_HANDLERS`): an unknown model or file
is ``ModelNotFound`` (404); a bad model name, or a path that is absolute, has an empty, ``.`` or
``..`` segment, or leads out of the checkpoint folder through a symlink is ``InvalidRequest``
(400).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from sllm import routes
from sllm.errors import CheckpointError, InvalidRequest, ModelNotFound, SllmError
from sllm.http import model_response
from sllm.messages import CheckpointFile, CheckpointListing
from store.checkpoint.format import INDEX_NAME
from store.model_store import ModelStore


def index_sha256(path: Path) -> str:
    """The sha256 hex digest of ``<path>/index.json``: the version of the checkpoint at ``path``.

    Raises:
        CheckpointError: the index is missing or unreadable.
    """
    file = Path(path) / INDEX_NAME
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing checkpoint index") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read the checkpoint index: {e}") from e


def check_relpath(name: str) -> str:
    """Return ``name`` if it is a safe path of a file inside a checkpoint folder: relative, posix
    separators, no empty, ``.`` or ``..`` segment, no NUL or backslash.

    Raises:
        InvalidRequest: it is not.
    """
    if not name or "\x00" in name or "\\" in name or any(
        part in ("", ".", "..") for part in name.split("/")
    ):
        raise InvalidRequest(f"bad checkpoint file path {name!r}: use a relative path inside the "
                             "checkpoint folder", param="path")
    return name


def resolve_file(folder: Path, name: str) -> Path:
    """The regular file ``name`` (see :func:`check_relpath`) of the checkpoint folder ``folder``,
    with symlinks resolved.

    Raises:
        InvalidRequest: ``name`` is not a safe relative path, or leads out of ``folder`` through
            a symlink.
        ModelNotFound: there is no regular file of that name.
    """
    root = Path(folder).resolve()
    try:
        path = (root / check_relpath(name)).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ModelNotFound(f"cannot resolve {name!r} in {folder}: {e}", param="path") from e
    if not path.is_relative_to(root):
        raise InvalidRequest(f"{name!r} leads out of the checkpoint folder", param="path")
    if not path.is_file():
        raise ModelNotFound(f"no file {name!r} in the checkpoint {folder}", param="path")
    return path


def checkpoint_files(folder: Path) -> list[CheckpointFile]:
    """Every regular file under ``folder``, recursively, sorted by name, with its size in bytes.
    Symlinks count only when they lead to a file inside ``folder``.

    Raises:
        OSError: ``folder`` cannot be listed.
    """
    root = Path(folder)
    out: list[CheckpointFile] = []
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            name = (Path(dirpath) / filename).relative_to(root).as_posix()
            try:
                out.append(CheckpointFile(name=name, size=resolve_file(root, name).stat().st_size))
            except (SllmError, OSError):
                continue  # leads outside, vanished, or a name no client could ask for
    return sorted(out, key=lambda f: f.name)


def checkpoint_file_routes(store: ModelStore) -> list[Route]:
    """The routes of the checkpoint file API over ``store``, for an app built with
    :data:`sllm.http.EXCEPTION_HANDLERS`."""

    async def listing(request: Request) -> Response:
        body = await asyncio.to_thread(describe_checkpoint, store, request.path_params["model"])
        return model_response(body)

    async def file(request: Request) -> Response:
        path, stat = await asyncio.to_thread(
            _locate, store, request.path_params["model"], request.path_params["path"]
        )
        return FileResponse(path, stat_result=stat, media_type="application/octet-stream")

    return [
        Route(routes.Invoker.CHECKPOINT, listing, methods=["GET"]),
        Route(routes.Invoker.CHECKPOINT_FILE, file, methods=["GET"]),
    ]


def describe_checkpoint(store: ModelStore, model: str) -> CheckpointListing:
    """The listing of ``model``'s checkpoint folder (blocking: reads the folder and the index).

    Raises:
        ModelNotFound: no such model. InvalidRequest: a bad name.
        CheckpointError: its index cannot be read.
    """
    folder = store.path(model)
    return CheckpointListing(
        model=model, index_sha256=index_sha256(folder), files=checkpoint_files(folder)
    )


def _locate(store: ModelStore, model: str, name: str) -> tuple[Path, os.stat_result]:
    """The file ``name`` of ``model``'s checkpoint and its stat. Raises ModelNotFound,
    InvalidRequest (see the module docstring)."""
    path = resolve_file(store.path(model), name)
    return path, path.stat()
