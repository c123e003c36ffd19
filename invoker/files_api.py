"""The checkpoint file API: an invoker serves the checkpoints of its model store to its peers.

::

    GET /v1/checkpoints/{model}               CheckpointListing: every regular file of the
                                              checkpoint folder (relative posix path, size in
                                              bytes) and the sha256 hex of its index.json
    GET /v1/checkpoints/{model}/files/{path}  the file's bytes; honours ``Range: bytes=N-``
                                              (206 with Content-Range), so a fetch can resume

The client is :func:`invoker.transfer.fetch_checkpoint`. File bytes are streamed by starlette's
``FileResponse``, which reads in a worker thread; the listing, hashing and path checks run in a
thread as well, so the event loop never waits on the disk.

Errors (mapped to responses by :data:`sllm.http.EXCEPTION_HANDLERS`): an unknown model or file
is ``ModelNotFound`` (404); a bad model name, or a path that is absolute, has an empty, ``.`` or
``..`` segment, or leads out of the checkpoint folder through a symlink is ``InvalidRequest``
(400).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from invoker.store import ModelStore
from invoker.transfer import CheckpointListing, checkpoint_files, index_sha256, resolve_file
from sllm.http import model_response


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
        Route("/v1/checkpoints/{model}", listing, methods=["GET"]),
        Route("/v1/checkpoints/{model}/files/{path:path}", file, methods=["GET"]),
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
