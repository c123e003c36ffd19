"""Failures through the whole runtime: a client that goes away mid-stream, an invoker killed with
SIGKILL. The runtime answers with clear errors and never wedges."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.importer import import_model
from store.model_store import ModelStore
from tests.helpers.cluster import Cluster, manifest, running_cluster, wait_for
from tests.helpers.tiny_model import save_tiny_llama


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    src = save_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", seed=0)
    tiny = manifest("tiny", "tiny-llama", generation={"maxTokens": 200})
    with running_cluster(tmp_path_factory.mktemp("home"), models={"tiny-llama": src},
                         functions=[tiny]) as c:
        yield c


def test_first_cold_start_fetches_the_checkpoint_then_it_is_on_the_dram_tier(cluster: Cluster) -> None:
    """The invoker starts with an empty local store: the first cold start fetches the
    checkpoint from the store root (tier "remote"), after which the invoker holds it on SSD and
    in its DRAM pool."""
    with cluster.client() as c:
        assert c.get("/v1/checkpoints").json()["checkpoints"] == []
        first = c.post("/v1/functions/tiny/invoke", json={"prompt": "hi", "max_tokens": 2}).json()
        assert first["timings"]["cold_start"] and first["timings"]["tier"] == "remote"
        records = c.get("/v1/checkpoints").json()["checkpoints"]
        assert [(r["invoker_id"], r["model"], r["tier"]) for r in records] == [("invoker-0", "tiny-llama", "dram")]
        inst = c.get("/v1/instances").json()["instances"][0]
        assert inst["tier"] == "remote" and inst["transfer_seconds"] > 0
        assert inst["placement"]["chosen"]["tier"] == "remote"


def test_client_disconnect_mid_stream_releases_the_instance(cluster: Cluster) -> None:
    with cluster.client() as c:
        with c.stream("POST", "/v1/functions/tiny/invoke", json={"prompt": "hi", "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(4)]  # two token events, then hang up
            assert seen[0].startswith("event: token")

        def idle() -> bool:
            insts = c.get("/v1/instances").json()["instances"]
            return [i["state"] for i in insts if i["function"] == "tiny"] == ["idle"]

        assert wait_for(idle), c.get("/v1/instances").text
        r = c.post("/v1/functions/tiny/invoke", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_corrupt_checkpoint_is_a_clear_error_and_the_runtime_keeps_serving(
    cluster: Cluster, tmp_path: Path
) -> None:
    src = save_tiny_llama(tmp_path / "src", seed=3)
    info = import_model(str(src), ModelStore(cluster.store), name="tiny-corrupt")
    data = info.path / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    cluster.deploy(manifest("tiny-corrupt", "tiny-corrupt"))
    with cluster.client() as c:
        r = c.post("/v1/functions/tiny-corrupt/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "checkpoint_error"
        assert "checksum mismatch" in r.json()["error"]["message"]
        assert not [i for i in c.get("/v1/instances").json()["instances"] if i["function"] == "tiny-corrupt"]
        ok = c.post("/v1/functions/tiny/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_killed_invoker_gives_clear_errors_then_503_with_retry_after(cluster: Cluster) -> None:
    with cluster.client() as c:
        assert c.post("/v1/functions/tiny/invoke", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        invoker = next(p for p in cluster.state.processes if p.name == "invoker-0")
        os.kill(invoker.pid, signal.SIGKILL)
        r = c.post("/v1/functions/tiny/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code in (502, 503), r.text
        assert r.json()["error"]["message"]
        # the invoker's lease expires; the controller marks its instance lost
        assert wait_for(lambda: c.get("/v1/invokers").json()["invokers"] == [], timeout=40)
        insts = c.get("/v1/instances").json()["instances"]
        assert insts and {i["state"] for i in insts} == {"lost"}, insts
        assert all("invoker-0" in i["reason"] for i in insts)
        r = c.post("/v1/functions/tiny/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503
        assert "no invoker" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/health").status_code == 200
        assert c.get("/v1/functions/tiny").status_code == 200
