"""Burst-ready replication on a real local cluster (three invokers, each with room for one
instance, replication on): an in-use function's checkpoint is copied to the other invokers in
the background, so its next burst starts every instance from a local copy; a function whose
holder can host all its instances gets no copy; and the invoker's copy endpoint fetches once,
is idempotent, and refuses bad input.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers.cluster import Cluster, manifest, running_cluster, wait_for
from tests.helpers.tiny_model import save_tiny_llama


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    src = tmp_path_factory.mktemp("src")
    models = {name: save_tiny_llama(src / name, seed=i)
              for i, name in enumerate(("tiny-a", "tiny-b", "tiny-c"))}
    with running_cluster(tmp_path_factory.mktemp("home"), models=models, invokers=3,
                         memory="300Mi", invoker_lease_ttl=3, replication=True) as c:
        yield c


def holders(c: httpx.Client, model: str) -> set[str]:
    return {r["invoker_id"] for r in c.get("/v1/checkpoints").json()["checkpoints"]
            if r["model"] == model}


def instances(c: httpx.Client, function: str) -> list[dict[str, Any]]:
    return [i for i in c.get("/v1/instances").json()["instances"]
            if i["function"] == function and i["state"] not in ("stopped", "lost")]


def test_an_in_use_function_is_copied_ahead_and_its_burst_starts_from_local_copies(
        cluster: Cluster) -> None:
    cluster.deploy(manifest("rep", "tiny-a", scaling={"maxInstances": 3, "keepAlive": "60s"}))
    with cluster.client() as c:
        assert holders(c, "tiny-a") == set()
        r = c.post("/v1/functions/rep/invoke", json={"prompt": "hi", "max_tokens": 200})
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["tier"] == "remote"  # no invoker had it: from the store root
        first = r.json()["instance_id"]
        # each invoker hosts one instance: copies go to the two others, in the background
        wait_for(lambda: len(holders(c, "tiny-a")) == 3)
        log = (cluster.home / "run" / "controller.log").read_text()
        assert log.count("replicating tiny-a (function rep)") >= 2
        tiers: list[str | None] = []
        with httpx.Client(base_url=cluster.gateway, timeout=120) as c2:
            def call() -> None:
                r = c2.post("/v1/functions/rep/invoke", json={"prompt": "hi", "max_tokens": 200})
                assert r.status_code == 200, r.text
                tiers.append(r.json()["timings"]["tier"])

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        got = instances(c, "rep")
        assert len({i["invoker_id"] for i in got}) == 3  # scaled out to every invoker
        # every new instance loaded from a local copy: none had to fetch on the burst's path
        assert all(i["tier"] == "ssd" for i in got if i["id"] != first), got
        assert "remote" not in tiers


def test_a_function_its_holder_can_host_entirely_is_not_copied(cluster: Cluster) -> None:
    cluster.deploy(manifest("solo", "tiny-b", scaling={"maxInstances": 1, "keepAlive": "60s"}))
    with cluster.client() as c:
        r = c.post("/v1/functions/solo/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        (home,) = wait_for(lambda: holders(c, "tiny-b"))
        time.sleep(1.5)  # several reconcile passes (0.2 s each)
        assert holders(c, "tiny-b") == {home}


def test_the_copy_endpoint_fetches_once_and_refuses_bad_input(cluster: Cluster) -> None:
    inv = next(p for p in cluster.state.processes if p.name == "invoker-1")
    peer = next(p for p in cluster.state.processes if p.name == "invoker-2")
    with httpx.Client(base_url=inv.url, timeout=60) as c:
        first = c.put("/v1/checkpoints/tiny-c", json={"sources": []})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["model"] == "tiny-c" and body["transferred_bytes"] > 0
        assert body["source"] == str(cluster.store)  # no peer named: the store root
        again = c.put("/v1/checkpoints/tiny-c", json={"sources": [peer.url]}).json()
        assert again["transferred_bytes"] == 0 and again["source"] is None
        listing = c.get("/v1/checkpoints/tiny-c").json()
        assert sum(f["size"] for f in listing["files"]) >= body["transferred_bytes"]
        assert c.put("/v1/checkpoints/no-such-model", json={}).status_code == 404
        assert c.put("/v1/checkpoints/Bad%20Name", json={}).status_code == 400
        assert c.put("/v1/checkpoints/tiny-c", content=b"{not json").status_code == 400
        assert c.put("/v1/checkpoints/tiny-c", json={"sources": [], "x": 1}).status_code == 400
    with cluster.client() as g:
        wait_for(lambda: "invoker-1" in holders(g, "tiny-c"))  # published like any copy
