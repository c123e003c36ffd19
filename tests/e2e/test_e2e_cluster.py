"""A real local cluster of three invokers (each with its own model store, DRAM tier and memory
budget, room for one instance): placement follows the checkpoint, checkpoints travel between
invokers, autoscaling honours min/max/keep-alive under a burst, the wait queue's bound and
deadline answer 429/503, and dead invokers' instances are marked lost while calls go elsewhere.
"""

from __future__ import annotations

import os
import signal
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
              for i, name in enumerate(("tiny-a", "tiny-b"))}
    # slower (hidden 384, 4 layers): a generation of 240 tokens holds its instance for seconds;
    # a context window of 1,024 tokens lets one hold it longer
    models["tiny-slow"] = save_tiny_llama(src / "slow", seed=2, hidden_size=384,
                                          num_hidden_layers=4, max_position_embeddings=1024)
    with running_cluster(tmp_path_factory.mktemp("home"), models=models, invokers=3,
                         memory="300Mi", invoker_lease_ttl=3) as c:
        yield c


def instances(c: httpx.Client, function: str, *, live: bool = True) -> list[dict[str, Any]]:
    got = [i for i in c.get("/v1/instances").json()["instances"] if i["function"] == function]
    return [i for i in got if i["state"] not in ("stopped", "lost")] if live else got


def invoke(c: httpx.Client, function: str, max_tokens: int = 2) -> dict[str, Any]:
    r = c.post(f"/v1/functions/{function}/invoke", json={"prompt": "hi", "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_invokers_split_the_machines_cores(cluster: Cluster) -> None:
    """One machine behaving as three servers: each invoker computes with its share of the
    cores (torch's default would give every one of them all the cores)."""
    share = max(1, (os.cpu_count() or 1) // 3)
    for p in cluster.state.processes:
        if p.name.startswith("invoker-"):
            health = httpx.get(f"{p.url}/health", timeout=5).json()
            assert health["component"] == "invoker" and health["compute_threads"] == share


def test_placement_follows_the_checkpoint_and_peers_share_it(cluster: Cluster) -> None:
    cluster.deploy(manifest("place", "tiny-slow", scaling={"maxInstances": 3, "keepAlive": "1s"}))
    with cluster.client() as c:
        # 200 tokens, as in the burst below: the service time the controller learns is longer
        # than a copy, so the burst scales out rather than waits (controller.service_time)
        first = invoke(c, "place", 200)
        assert first["timings"]["tier"] == "remote"  # no invoker has a copy: from the store root
        inst = instances(c, "place")[0]
        home = inst["invoker_id"]
        assert inst["fetched_from"] and inst["placement"]["considered"] == 3
        assert {e["tier"] for e in inst["placement"]["candidates"]} == {"remote"}
        wait_for(lambda: not instances(c, "place"))  # keep-alive 1 s: scaled to zero
        again = invoke(c, "place", 200)
        inst = instances(c, "place")[0]
        # the checkpoint is in that invoker's DRAM tier now: the estimate sends it back there
        assert again["timings"]["tier"] == "dram" and inst["invoker_id"] == home
        chosen = inst["placement"]["chosen"]
        assert chosen["tier"] == "dram" and chosen["total_seconds"] == min(
            e["total_seconds"] for e in inst["placement"]["candidates"])
        # a burst of three: one instance per invoker (memory), the new ones fetch from the peer
        cluster.deploy(manifest("place", "tiny-slow", scaling={"maxInstances": 3, "keepAlive": "60s"}))
        with httpx.Client(base_url=cluster.gateway, timeout=120) as c2:
            results: list[dict[str, Any]] = []
            threads = [threading.Thread(target=lambda: results.append(invoke(c2, "place", 200)))
                       for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(results) == 3
        placed = instances(c, "place")
        assert len({i["invoker_id"] for i in placed}) == 3
        home_url = next(i["invoker_url"] for i in placed if i["invoker_id"] == home)
        fetched = [i for i in placed if i["invoker_id"] != home]
        assert fetched and all(i["tier"] == "remote" and i["fetched_from"] == home_url for i in fetched)
        held = {(r["invoker_id"], r["model"]) for r in c.get("/v1/checkpoints").json()["checkpoints"]}
        assert {inv for inv, m in held if m == "tiny-slow"} == {"invoker-0", "invoker-1", "invoker-2"}
    cluster_delete(cluster, "place")


def cluster_delete(cluster: Cluster, name: str) -> None:
    with cluster.client() as c:
        assert c.delete(f"/v1/functions/{name}").status_code == 200
        wait_for(lambda: not instances(c, name))


def test_burst_honours_min_max_and_keep_alive(cluster: Cluster) -> None:
    cluster.deploy(manifest("burst", "tiny-b", scaling={"minInstances": 1, "maxInstances": 2,
                                                        "targetConcurrency": 1, "keepAlive": "2s"}))
    with cluster.client() as c:
        wait_for(lambda: [i for i in instances(c, "burst") if i["state"] == "idle"])  # min 1
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            with httpx.Client(base_url=cluster.gateway, timeout=30) as w:
                while not stop.is_set():
                    peak = max(peak, len(instances(w, "burst")))
                    time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        codes: list[int] = []
        with httpx.Client(base_url=cluster.gateway, timeout=120) as c2:
            def call() -> None:
                r = c2.post("/v1/functions/burst/invoke", json={"prompt": "hi", "max_tokens": 30})
                codes.append(r.status_code)

            threads = [threading.Thread(target=call) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stop.set()
        watcher.join()
        assert codes == [200] * 6
        assert peak == 2  # scaled out to maxInstances, never past it
        time.sleep(2.5)  # past keep-alive: back down to minInstances, never to zero
        wait_for(lambda: len(instances(c, "burst")) == 1)
        time.sleep(1.0)
        assert [i["state"] for i in instances(c, "burst")] == ["idle"]
    cluster_delete(cluster, "burst")


def test_queue_bound_and_deadline_answer_429_and_503_with_retry_after(cluster: Cluster) -> None:
    # the long call holds the one instance for seconds (900 tokens); the queued call waits 1 s
    # for it and gives up, and the third call, sent 0.3 s after the queued one, finds it queued
    # (with a 0.3 s timeout and 0.1 s between them, a busy machine sometimes broke the order)
    cluster.deploy(manifest("queue", "tiny-slow", scaling={"maxInstances": 1, "maxQueue": 1,
                                                        "queueTimeout": "1s"}))
    with cluster.client() as c:
        invoke(c, "queue", 1)  # loaded and idle
        first_token = threading.Event()
        outcome: dict[str, Any] = {}

        def long_call() -> None:
            with httpx.Client(base_url=cluster.gateway, timeout=120) as c2, c2.stream(
                "POST", "/v1/functions/queue/invoke",
                json={"prompt": "hi", "max_tokens": 900, "ignore_eos": True, "stream": True},
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        first_token.set()
                outcome["long"] = r.status_code

        def queued_call() -> None:
            with httpx.Client(base_url=cluster.gateway, timeout=120) as c3:
                outcome["queued"] = c3.post("/v1/functions/queue/invoke", json={"prompt": "hi"})

        busy = threading.Thread(target=long_call)
        busy.start()
        assert first_token.wait(60)
        queued = threading.Thread(target=queued_call)
        queued.start()
        time.sleep(0.3)
        full = c.post("/v1/functions/queue/invoke", json={"prompt": "hi"})  # the queue holds 1
        queued.join()
        busy.join()
        assert full.status_code == 429, full.text
        assert int(full.headers["retry-after"]) >= 1 and "waiting" in full.json()["error"]["message"]
        late = outcome["queued"]
        assert late.status_code == 503, late.text
        assert int(late.headers["retry-after"]) >= 1 and "1 s" in late.json()["error"]["message"]
        assert outcome["long"] == 200
        invoke(c, "queue")  # and the function still serves
    cluster_delete(cluster, "queue")


def test_a_burst_leaves_room_for_another_functions_call(cluster: Cluster) -> None:
    """Room between functions (controller.pool): ``hog`` fills all three invokers with a burst
    of nine long calls; a call of ``small`` (no instance) arriving then, less than one of hog's
    service times after hog's queued calls, gets an instance as soon as one of hog's frees,
    ahead of hog's queue, rather than after the queue drains (8th or later)."""
    cluster.deploy(manifest("hog", "tiny-slow", scaling={"maxInstances": 3, "maxQueue": 20,
                                                         "keepAlive": "60s"}))
    cluster.deploy(manifest("small", "tiny-a", scaling={"keepAlive": "60s"}))
    order: list[str] = []  # functions in the order their answers (200 OK) came

    def call(c2: httpx.Client, function: str, max_tokens: int) -> None:
        invoke(c2, function, max_tokens)
        order.append(function)

    with cluster.client() as c, httpx.Client(base_url=cluster.gateway, timeout=120) as c2:
        hogs = [threading.Thread(target=call, args=(c2, "hog", 200)) for _ in range(9)]
        for t in hogs:
            t.start()
        wait_for(lambda: sum(i["state"] == "active" for i in instances(c, "hog")) == 3)
        small = threading.Thread(target=call, args=(c2, "small", 2))
        small.start()
        for t in (small, *hogs):
            t.join()
        assert sorted(order) == ["hog"] * 9 + ["small"]
        # small is placed where hog's first freed instance was and answers within the next
        # round (2nd or 3rd here); without a share between functions it waited for hog's
        # queue (8th)
        assert order.index("small") <= 4, order
    cluster_delete(cluster, "hog")
    cluster_delete(cluster, "small")


def test_dead_invokers_instances_are_lost_and_calls_go_elsewhere(cluster: Cluster) -> None:
    """Last in the module: it kills two of the three invokers."""
    cluster.deploy(manifest("dead", "tiny-a", scaling={"keepAlive": "60s"}))
    with cluster.client() as c:
        invoke(c, "dead")
        victim = instances(c, "dead")[0]
        pid = next(p.pid for p in cluster.state.processes if p.name == victim["invoker_id"])
        os.kill(pid, signal.SIGKILL)
        # no call meanwhile: the lease (3 s) expires and the controller marks the instance lost
        lost = wait_for(lambda: [i for i in instances(c, "dead", live=False) if i["state"] == "lost"],
                        timeout=20)
        assert lost[0]["id"] == victim["id"] and "lease" in lost[0]["reason"]
        out = invoke(c, "dead")
        assert out["timings"]["cold_start"]
        now = instances(c, "dead")[0]
        assert now["invoker_id"] != victim["invoker_id"]
        # kill the new home and call at once: the gateway cannot reach it, the controller
        # checks it, marks its instance lost, and the call is placed on the last invoker
        pid = next(p.pid for p in cluster.state.processes if p.name == now["invoker_id"])
        os.kill(pid, signal.SIGKILL)
        out = invoke(c, "dead")
        third = instances(c, "dead")[0]
        assert third["invoker_id"] not in (victim["invoker_id"], now["invoker_id"])
        states = {i["id"]: i["state"] for i in instances(c, "dead", live=False)}
        assert states[now["id"]] == "lost" and states[victim["id"]] == "lost"
