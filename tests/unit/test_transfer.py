"""Checkpoint transfer between invokers: the file API over real HTTP on loopback, and
fetch_checkpoint from peers and origin folders (resuming, checksums, versions, cancellation)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from starlette.applications import Starlette

from cli.launcher import free_port
from sllm.errors import CheckpointError, ModelNotFound, Unavailable
from sllm.http import EXCEPTION_HANDLERS
from store.checkpoint import load_checkpoint, write_config, write_tensors
from store.files_api import checkpoint_file_routes, index_sha256
from store.model_store import ModelStore
from store.transfer import fetch_checkpoint

Serve = Callable[[ModelStore], str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(store)`` runs the checkpoint file API over ``store`` on a free loopback port (uvicorn
    in a thread) and returns its base URL; every server stops when the test ends."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(store: ModelStore) -> str:
        app = Starlette(routes=checkpoint_file_routes(store), exception_handlers=EXCEPTION_HANDLERS)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off", ws="none"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def _put(store: ModelStore, name: str = "m", *, seed: int = 0) -> Path:
    """A tiny checkpoint of ~300 KiB: three data files (16 KiB checksum chunks), config.json and
    tokenizer files, one of them nested. Equal seeds give byte-identical folders."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "embed": torch.randn(256, 256, generator=g),  # 256 KiB: a data file of its own
        "proj": torch.randn(64, 64, generator=g),
        "norm": torch.ones(64),
    }
    staging = store.staging_dir(name)
    write_tensors(staging, tensors, meta={"name": name, "created": 1.0, "seed": seed},
                  file_bytes=64 << 10, chunk_bytes=16 << 10)
    write_config(staging, {"model_type": "llama", "hidden_size": 64, "seed": seed})
    (staging / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (staging / "tokenizer").mkdir()
    (staging / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": {"a": seed}}))
    store.commit(name, staging)
    return store.path(name)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _size(folder: Path) -> int:
    return sum(len(b) for b in _files(folder).values())


def _biggest_data_file(folder: Path) -> str:
    return max((p for p in folder.glob("data-*.bin")), key=lambda p: p.stat().st_size).name


def _interrupted(src: Path, dest: ModelStore, file: str, prefix: bytes) -> None:
    """Leave in ``dest`` what a fetch of ``src`` (model "m") interrupted in ``file`` leaves: the
    partial folder with the index and ``prefix`` as the file's first bytes."""
    partial = dest.partial_dir("m")
    partial.mkdir()
    shutil.copy(src / "index.json", partial / "index.json")
    (partial / file).write_bytes(prefix)


def _corrupt_copy(src: Path, store: ModelStore, file: str) -> None:
    """Copy the checkpoint ``src`` into ``store`` under the same name with one byte of ``file``
    flipped (same size, same index: only a checksum can tell)."""
    dest = store.root / src.name
    shutil.copytree(src, dest)
    data = bytearray((dest / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / file).write_bytes(bytes(data))


class _CancelOnceStarted(threading.Event):
    """A cancel flag that is up as soon as ``file`` holds some bytes: a fetch cancelled midway."""

    def __init__(self, file: Path) -> None:
        super().__init__()
        self.file = file

    def is_set(self) -> bool:
        return self.file.exists() and self.file.stat().st_size > 0


@pytest.fixture
def source(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "peer")
    _put(store)
    return store


@pytest.fixture
def dest(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "local")


def test_fetch_from_a_peer_copies_every_file_and_lists_the_model(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    url = serve(source)

    result = fetch_checkpoint("m", dest, [url], chunk_bytes=32 << 10)

    assert result.model == "m" and result.source == url
    assert result.nbytes == _size(source.path("m")) and result.transferred == result.nbytes
    assert result.seconds > 0
    assert _files(dest.path("m")) == _files(source.path("m"))
    assert [m.name for m in dest.list()] == ["m"]
    assert not dest.partial_dir("m").exists()
    loaded = load_checkpoint(dest.path("m"))
    expected = load_checkpoint(source.path("m"))
    assert all(torch.equal(loaded.tensors[k], t) for k, t in expected.tensors.items())


def test_a_partial_fetch_resumes_where_it_stopped(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    src = source.path("m")
    big = _biggest_data_file(src)
    _interrupted(src, dest, big, (src / big).read_bytes()[:40000])

    result = fetch_checkpoint("m", dest, [serve(source)], chunk_bytes=16 << 10)

    assert result.transferred == result.nbytes - (src / "index.json").stat().st_size - 40000
    assert _files(dest.path("m")) == _files(src)
    load_checkpoint(dest.path("m"), verify=True)


def test_a_corrupt_partial_prefix_fails_its_checksum_and_is_fetched_again(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    src = source.path("m")
    big = _biggest_data_file(src)
    garbage = torch.randint(0, 256, (40000,), dtype=torch.uint8, generator=torch.Generator())
    _interrupted(src, dest, big, garbage.numpy().tobytes())

    result = fetch_checkpoint("m", dest, [serve(source)])

    # every file but the index, less the 40000 bytes resumed from, plus the whole file again
    index_bytes = (src / "index.json").stat().st_size
    size = (src / big).stat().st_size
    assert result.transferred == result.nbytes - index_bytes - 40000 + size
    assert _files(dest.path("m")) == _files(src)


def test_a_source_serving_corrupt_data_is_given_up_for_the_next_one(
    serve: Serve, source: ModelStore, dest: ModelStore, tmp_path: Path
) -> None:
    bad = ModelStore(tmp_path / "bad-peer")
    _corrupt_copy(source.path("m"), bad, "data-00001.bin")
    origin = tmp_path / "origin"
    _put(ModelStore(origin))
    bad_url = serve(bad)

    result = fetch_checkpoint("m", dest, [bad_url, origin])

    assert result.source == str(origin)
    assert _files(dest.path("m")) == _files(source.path("m"))
    assert result.transferred < result.nbytes  # what the bad peer sent intact was kept


def test_with_only_corrupt_sources_the_fetch_fails_with_checkpoint_error(
    serve: Serve, source: ModelStore, dest: ModelStore, tmp_path: Path
) -> None:
    bad = ModelStore(tmp_path / "bad-peer")
    _corrupt_copy(source.path("m"), bad, "data-00000.bin")
    bad_url = serve(bad)

    with pytest.raises(CheckpointError, match="data-00000.bin") as e:
        fetch_checkpoint("m", dest, [bad_url, tmp_path / "empty-origin"])

    assert bad_url in e.value.message and "empty-origin" in e.value.message
    assert not dest.exists("m")


def test_sources_without_the_model_give_model_not_found_and_unreachable_ones_unavailable(
    serve: Serve, dest: ModelStore, tmp_path: Path
) -> None:
    empty_peer = serve(ModelStore(tmp_path / "empty-peer"))
    dead_peer = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(ModelNotFound):
        fetch_checkpoint("m", dest, [empty_peer, tmp_path / "empty-origin"])
    with pytest.raises(Unavailable, match=dead_peer):
        fetch_checkpoint("m", dest, [empty_peer, dead_peer])


def test_a_partial_fetch_of_another_version_is_wiped(
    serve: Serve, source: ModelStore, dest: ModelStore, tmp_path: Path
) -> None:
    other = _put(ModelStore(tmp_path / "other"), seed=1)
    partial = dest.partial_dir("m")
    shutil.copytree(other, partial)
    (partial / "stray.bin").write_bytes(b"left over")

    result = fetch_checkpoint("m", dest, [serve(source)])

    assert result.transferred == result.nbytes
    assert _files(dest.path("m")) == _files(source.path("m"))


def test_an_up_to_date_local_copy_moves_nothing(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    url = serve(source)
    fetch_checkpoint("m", dest, [url])

    again = fetch_checkpoint("m", dest, [url])

    assert again.transferred == 0 and again.nbytes == _size(source.path("m"))


def test_a_stale_local_copy_is_replaced(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    _put(dest, seed=1)
    assert index_sha256(dest.path("m")) != index_sha256(source.path("m"))

    result = fetch_checkpoint("m", dest, [serve(source)])

    assert result.transferred == result.nbytes
    assert _files(dest.path("m")) == _files(source.path("m"))
    assert [p.name for p in dest.root.iterdir() if p.is_dir()] == ["m"]


def test_a_cancelled_fetch_keeps_its_partial_data_and_a_folder_source_resumes_it(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    src = source.path("m")
    started = dest.partial_dir("m") / _biggest_data_file(src)

    with pytest.raises(Unavailable, match="cancelled"):
        fetch_checkpoint("m", dest, [serve(source)], chunk_bytes=16 << 10,
                         cancel=_CancelOnceStarted(started))

    kept = started.stat().st_size
    assert 0 < kept < (src / started.name).stat().st_size and not dest.exists("m")
    result = fetch_checkpoint("m", dest, [source.root], chunk_bytes=16 << 10)
    assert result.source == str(source.root)
    assert result.transferred < result.nbytes - kept
    assert _files(dest.path("m")) == _files(src)


def test_concurrent_fetches_of_one_model_move_it_once(
    serve: Serve, source: ModelStore, dest: ModelStore
) -> None:
    url = serve(source)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: fetch_checkpoint("m", dest, [url]), range(2)))

    assert sorted(r.transferred for r in results) == [0, _size(source.path("m"))]
    assert _files(dest.path("m")) == _files(source.path("m"))


def test_the_listing_names_every_file_with_its_size_and_the_index_hash(
    serve: Serve, source: ModelStore
) -> None:
    src = source.path("m")

    body = httpx.get(f"{serve(source)}/v1/checkpoints/m").json()

    assert body["model"] == "m" and body["index_sha256"] == index_sha256(src)
    assert body["files"] == [{"name": k, "size": len(v)} for k, v in _files(src).items()]
    assert "tokenizer/tokenizer.json" in [f["name"] for f in body["files"]]


def test_the_server_answers_range_requests_with_206_and_the_bytes_asked_for(
    serve: Serve, source: ModelStore
) -> None:
    data = (source.path("m") / "data-00000.bin").read_bytes()
    url = f"{serve(source)}/v1/checkpoints/m/files/data-00000.bin"

    middle = httpx.get(url, headers={"Range": "bytes=100-199"})
    tail = httpx.get(url, headers={"Range": "bytes=5000-"})
    whole = httpx.get(url)

    assert middle.status_code == 206 and middle.content == data[100:200]
    assert middle.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert tail.status_code == 206 and tail.content == data[5000:]
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("path", ["..%2F..%2Fsecret", "%2Fetc%2Fpasswd", "a%2F..%2F..%2Fsecret",
                                  "escape"])
def test_paths_leading_out_of_the_checkpoint_are_refused(
    serve: Serve, source: ModelStore, path: str
) -> None:
    (source.root / "secret").write_text("not a checkpoint file")
    (source.path("m") / "escape").symlink_to(source.root / "secret")
    base = serve(source)

    r = httpx.get(f"{base}/v1/checkpoints/m/files/{path}")
    listing = httpx.get(f"{base}/v1/checkpoints/m").json()

    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "escape" not in [f["name"] for f in listing["files"]]


@pytest.mark.parametrize("path", ["/v1/checkpoints/nope", "/v1/checkpoints/nope/files/index.json",
                                  "/v1/checkpoints/m/files/data-00099.bin"])
def test_unknown_models_and_files_are_404_with_the_error_body(
    serve: Serve, source: ModelStore, path: str
) -> None:
    r = httpx.get(serve(source) + path)

    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "not_found_error"
    assert error["message"]


def test_a_rate_cap_paces_the_fetch(source: ModelStore, dest: ModelStore) -> None:
    """``rate_bps`` (an emulated network link for benchmarks) keeps the average rate under the
    cap: the fetch cannot end before size / rate, and the copy is still whole."""
    size = _size(source.path("m"))
    rate = size / 0.3  # the checkpoint in no less than 0.3 s
    result = fetch_checkpoint("m", dest, [source.root], rate_bps=rate)
    assert result.seconds >= 0.3 * (result.transferred / size) - 0.01
    assert _files(dest.path("m")) == _files(source.path("m"))
    with pytest.raises(ValueError):
        fetch_checkpoint("m", dest, [source.root], rate_bps=0)


def test_a_cancel_cuts_a_paced_fetch_short(source: ModelStore, dest: ModelStore) -> None:
    """A fetch on a slow emulated link stops soon after ``cancel`` is set (a paused
    replication), not after the pacing sleep; what it wrote is kept."""
    rate = _size(source.path("m")) / 60  # the checkpoint in no less than 60 s
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="cancelled"):
        fetch_checkpoint("m", dest, [source.root], rate_bps=rate, cancel=cancel)
    assert time.monotonic() - t0 < 30  # far less than the 60 s the pacing asks for
    assert dest.partial_dir("m").exists() and not dest.exists("m")
