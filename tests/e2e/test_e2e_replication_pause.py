"""Pausing a replication (``DELETE /v1/checkpoints/{model}/replication``), on real invokers.

Two invokers with room for one instance each, replication on; checkpoint fetches are capped at
100 KB/s, so a copy of a tiny checkpoint (~430 KB) takes about 4 s and can be caught midway. A
paused copy answers its ``PUT`` with 503, keeps its partial data, and the next copy continues
it; a copy a load has joined is not paused (the load needs it). The controller pauses the
copies running when an invocation starts waiting for an instance, and makes them again once
calm. Its bookkeeping is in tests/unit/test_replication.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from store.model_store import ModelStore
from tests.helpers.cluster import Cluster, manifest, running_cluster, stream, wait_for
from tests.helpers.tiny_model import save_tiny_llama


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    src = tmp_path_factory.mktemp("src")
    models = {name: save_tiny_llama(src / name, seed=i, max_position_embeddings=32768)
              for i, name in enumerate(("tiny-a", "tiny-b", "tiny-c", "tiny-d"))}
    with running_cluster(tmp_path_factory.mktemp("home"), models=models, invokers=2,
                         memory="300Mi", invoker_network_limit="100K", replication=True) as c:
        yield c


def invoker_url(cluster: Cluster, index: int) -> str:
    return next(p.url for p in cluster.state.processes if p.name == f"invoker-{index}")


def partial_dir(cluster: Cluster, index: int, model: str) -> Path:
    """The folder of the invoker's partial fetch of ``model`` (it exists from the fetch's
    start, holding the index, until the copy is committed)."""
    return ModelStore(cluster.home / "invokers" / f"invoker-{index}" / "models").partial_dir(model)


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    """Run ``call()`` (an HTTP request) in a thread; its response lands in ``out["r"]``."""
    out: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: out.update(r=call()))
    t.start()
    return t, out


def test_a_paused_copy_keeps_its_partial_data_and_the_next_copy_continues_it(
        cluster: Cluster) -> None:
    with httpx.Client(base_url=invoker_url(cluster, 0), timeout=60) as c:
        copy, out = in_thread(lambda: c.put("/v1/checkpoints/tiny-a", json={"sources": []}))
        partial = partial_dir(cluster, 0, "tiny-a")
        wait_for(partial.exists)
        r = c.delete("/v1/checkpoints/tiny-a/replication")
        assert r.status_code == 200 and r.json() == {"model": "tiny-a", "paused": True}
        copy.join(30)
        assert out["r"].status_code == 503, out["r"].text
        assert "cancelled" in out["r"].json()["error"]["message"]
        kept = size(partial)  # the index at least
        assert kept > 0
        # nothing runs now: nothing to pause
        assert c.delete("/v1/checkpoints/tiny-a/replication").json()["paused"] is False
        again = c.put("/v1/checkpoints/tiny-a", json={"sources": []})
        assert again.status_code == 200, again.text
        listing = c.get("/v1/checkpoints/tiny-a").json()
        nbytes = sum(f["size"] for f in listing["files"])
        assert again.json()["transferred_bytes"] <= nbytes - kept  # continued, not redone
        assert not partial.exists()
        assert c.delete("/v1/checkpoints/Bad%20Name/replication").status_code == 400


def test_a_copy_a_load_has_joined_is_not_paused(cluster: Cluster) -> None:
    with httpx.Client(base_url=invoker_url(cluster, 1), timeout=60) as c:
        copy, copied = in_thread(lambda: c.put("/v1/checkpoints/tiny-b", json={"sources": []}))
        wait_for(partial_dir(cluster, 1, "tiny-b").exists)
        load, loaded = in_thread(lambda: c.post("/v1/instances", json={
            "instance_id": "tiny-b-1", "function": "b", "model": "tiny-b"}))
        # the load joins the copy at once (an idle invoker takes milliseconds); the copy has
        # seconds left at 100 KB/s
        time.sleep(1.0)
        assert not loaded and not copied, "the copy ended before the test could pause it"
        r = c.delete("/v1/checkpoints/tiny-b/replication")
        assert r.status_code == 200 and r.json()["paused"] is False
        copy.join(30)
        load.join(30)
        assert copied["r"].status_code == 200, copied["r"].text
        assert copied["r"].json()["transferred_bytes"] > 0
        assert loaded["r"].status_code == 200, loaded["r"].text
        assert loaded["r"].json()["tier"] == "remote"
        assert c.delete("/v1/instances/tiny-b-1").status_code == 200


def test_a_waiting_invocation_pauses_a_copy_and_the_copy_is_made_once_calm(
        cluster: Cluster) -> None:
    log = cluster.home / "run" / "controller.log"
    cluster.deploy(manifest("solo", "tiny-d", scaling={"maxInstances": 1, "keepAlive": "300s"}))
    cluster.deploy(manifest("rep", "tiny-c", scaling={"maxInstances": 2, "keepAlive": "300s"}))
    with cluster.client() as c:
        # solo's only instance busy with a long generation, on one invoker
        started, stop, out = threading.Event(), threading.Event(), {}
        busy = threading.Thread(target=lambda: out.update(stream(
            cluster, "solo", lambda n: started.set() if n == 5 else None, stop=stop,
            prompt="hi", max_tokens=30000, ignore_eos=True)))
        busy.start()
        try:
            assert started.wait(60)
            # rep starts on the other invoker; in use, it is copied to solo's invoker (~4 s)
            r = c.post("/v1/functions/rep/invoke", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            wait_for(lambda: "replicating tiny-c (function rep)" in log.read_text())
            wait_for(lambda: any(partial_dir(cluster, i, "tiny-c").exists() for i in (0, 1)))
            # a second call of solo waits for its instance: the copy pauses
            waiter, answer = in_thread(lambda: c.post(
                "/v1/functions/solo/invoke", json={"prompt": "hi", "max_tokens": 2}))
            wait_for(lambda: "paused the replication of tiny-c" in log.read_text())
        finally:
            stop.set()
            busy.join(60)
        waiter.join(60)
        assert answer["r"].status_code == 200, answer["r"].text
        assert answer["r"].json()["timings"]["queue_seconds"] > 0
        # once calm (CALM_S after the wait), the copy is planned again and continues where it
        # stopped: fewer bytes move than the checkpoint has
        done = wait_for(lambda: re.search(r"replicated tiny-c to (\S+): (\d+) bytes",
                                          log.read_text()), timeout=60)
        text = log.read_text()
        assert "replicating tiny-c to" not in text  # the pause was not taken for a failure
        assert text.count("replicating tiny-c (function rep)") == 2
        url = invoker_url(cluster, int(done[1].rsplit("-", 1)[1]))
        nbytes = sum(f["size"] for f in httpx.get(f"{url}/v1/checkpoints/tiny-c").json()["files"])
        assert 0 < int(done[2]) < nbytes
