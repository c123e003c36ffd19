"""The controller's durability: kill -9 and restart, failover between two controllers, a load
pending while the leader dies, and etcd briefly away. Functions are never lost, warm instances
keep serving, nothing is orphaned.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli import launcher
from sllm import config, keys
from sllm.etcd import Etcd
from sllm.messages import InstanceRecord
from tests.helpers.cluster import Cluster, manifest, running_cluster, wait_for
from tests.helpers.tiny_model import save_tiny_llama

TTL = 3  # the controllers' lease: a standby takes over this long after the leader dies


def models(tmp: pytest.TempPathFactory) -> dict[str, Path]:
    src = tmp.mktemp("src")
    return {"tiny-llama": save_tiny_llama(src / "tiny", seed=0),
            "tiny-slow": save_tiny_llama(src / "slow", seed=1, hidden_size=384, num_hidden_layers=4)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two controllers (controller-0 leads first), one invoker."""
    with running_cluster(tmp_path_factory.mktemp("home"), models=models(tmp_path_factory),
                         controllers=2, controller_lease_ttl=TTL) as c:
        yield c


def controller(cluster: Cluster, index: int) -> launcher.Process:
    name = f"controller-{index}" if index else "controller"
    return next(p for p in cluster.state.processes if p.name == name)


def role(cluster: Cluster, index: int) -> str | None:
    try:
        return httpx.get(f"{controller(cluster, index).url}/health", timeout=2).json()["role"]  # type: ignore[no-any-return]
    except httpx.HTTPError:
        return None


def kill_controller(cluster: Cluster, index: int) -> None:
    proc = controller(cluster, index)
    os.kill(proc.pid, signal.SIGKILL)
    launcher.stop_pid(proc.pid, timeout=5)  # reap it


def restart_controller(cluster: Cluster, index: int) -> None:
    """Start controller ``index`` again, under the same id and port."""
    old = controller(cluster, index)
    port = int(old.url.rsplit(":", 1)[1])
    argv = launcher.controller_argv(index, port, cluster.state.etcd_endpoint, cluster.store, 0.2,
                                   "ours", TTL)
    env = {**os.environ, "SLLM_HOME": str(cluster.home)}
    proc = launcher.spawn(old.name, argv, cluster.home / "run", env, stop_at_exit=True)
    cluster.state.processes[cluster.state.processes.index(old)] = launcher.Process(
        name=old.name, pid=proc.pid, url=old.url, log=old.log)
    launcher.wait_healthy(f"{old.url}/health", proc, Path(old.log))


def invoke(c: httpx.Client, function: str, max_tokens: int = 2) -> dict[str, Any]:
    r = c.post(f"/v1/functions/{function}/invoke", json={"prompt": "hi", "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def invoker_instances(cluster: Cluster) -> list[str]:
    url = next(p.url for p in cluster.state.processes if p.name == "invoker-0")
    return [i["instance_id"] for i in httpx.get(f"{url}/v1/instances").json()["instances"]]


def test_failover_and_restart_keep_functions_and_warm_instances(pair: Cluster) -> None:
    roles = wait_for(lambda: sorted((role(pair, 0), role(pair, 1))) == ["leader", "standby"]
                     and (role(pair, 0), role(pair, 1)))
    lead, standby = (0, 1) if roles[0] == "leader" else (1, 0)
    for name in ("f1", "f2"):
        pair.deploy(manifest(name, "tiny-llama"))
    with pair.client() as c:
        assert invoke(c, "f1")["timings"]["cold_start"]
        warm_id = invoker_instances(pair)
        # the leader dies: the standby takes over once its lease expires, adopts the instance
        kill_controller(pair, lead)
        t0 = time.monotonic()
        out = invoke(c, "f1")  # the gateway follows the new leader
        assert time.monotonic() - t0 < 2 * TTL + 5
        assert not out["timings"]["cold_start"], out  # the warm instance kept serving
        assert role(pair, standby) == "leader"
        assert {f["name"] for f in c.get("/v1/functions").json()["functions"]} == {"f1", "f2"}
        # the old leader comes back: it stands by
        restart_controller(pair, lead)
        assert role(pair, lead) == "standby"
        r = httpx.get(f"{controller(pair, lead).url}/v1/functions", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_leader"
        assert f"controller-{standby}" in r.json()["error"]["message"]
        # kill -9 the leader and start it again at once under its id: it leads again without
        # waiting for its old lease (the other may win the race first; either way one leads)
        kill_controller(pair, standby)
        restart_controller(pair, standby)
        wait_for(lambda: "leader" in (role(pair, 0), role(pair, 1)), timeout=2 * TTL + 5)
        out = invoke(c, "f1")
        assert not out["timings"]["cold_start"]
        assert invoker_instances(pair) == warm_id  # nothing orphaned, nothing reloaded
        assert {f["name"] for f in c.get("/v1/functions").json()["functions"]} == {"f1", "f2"}


def test_a_load_pending_when_the_leader_dies_is_finished_by_the_next(pair: Cluster) -> None:
    pair.deploy(manifest("pending", "tiny-slow"))
    leader = 0 if role(pair, 0) == "leader" else 1
    result: dict[str, Any] = {}

    def call() -> None:
        with httpx.Client(base_url=pair.gateway, timeout=120) as c2:
            result["r"] = c2.post("/v1/functions/pending/invoke", json={"prompt": "hi", "max_tokens": 2})

    t = threading.Thread(target=call)
    t.start()
    # kill the leader as soon as the cold start is under way (recorded in etcd before the load)
    wait_for(lambda: [r for r in etcd_instances(pair) if r.function == "pending"], timeout=30)
    kill_controller(pair, leader)
    t.join(120)
    assert result["r"].status_code == 200, result["r"].text
    records = [r for r in etcd_instances(pair) if r.function == "pending"]
    ids = invoker_instances(pair)
    wait_for(lambda: [r for r in etcd_instances(pair) if r.function == "pending" and r.state.value != "loading"])
    records = [r for r in etcd_instances(pair) if r.function == "pending"]
    assert len(records) == 1 and records[0].state.value in ("idle", "active")
    assert records[0].id in ids  # the one load there is, adopted, not duplicated or orphaned
    assert sum(1 for i in ids if i.startswith("pending-")) == 1
    restart_controller(pair, leader)


def etcd_instances(cluster: Cluster) -> list[InstanceRecord]:
    async def read() -> list[InstanceRecord]:
        async with Etcd(cluster.state.etcd_endpoint) as etcd:
            return await etcd.list(keys.Kind.INSTANCE, InstanceRecord)

    return asyncio.run(read())


def test_etcd_briefly_away_warm_invocations_flow_and_the_controller_catches_up(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # default leases: 10 s for the controller and the invoker
    with running_cluster(tmp_path_factory.mktemp("home"), models=models(tmp_path_factory),
                         functions=[manifest("steady", "tiny-llama"),
                                    manifest("later", "tiny-llama")]) as cluster, \
            cluster.client() as c:
        invoke(c, "steady")
        before = next(r for r in etcd_instances(cluster) if r.function == "steady")
        etcd = next(p for p in cluster.state.processes if p.name == "etcd")
        os.kill(etcd.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for _ in range(3):  # warm invocations do not touch etcd
                out = invoke(c, "steady")
                assert not out["timings"]["cold_start"]
            assert time.monotonic() - t0 < config.CONTROLLER_LEASE_TTL_S / 2
            time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
        finally:
            os.kill(etcd.pid, signal.SIGCONT)
        # the controller catches up: the instance's newer record reaches etcd
        wait_for(lambda: next(r for r in etcd_instances(cluster) if r.function == "steady").last_used
                 > (before.last_used or 0), timeout=20)
        assert invoke(c, "later")["timings"]["cold_start"]  # and cold starts work again
        assert {r.function for r in etcd_instances(cluster)} == {"steady", "later"}
