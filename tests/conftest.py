"""Shared fixtures: a real etcd server and real runtimes on ephemeral loopback ports.

Every process a fixture starts is stopped in its ``finally``, so a failing test never leaves
etcd or a service behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli import launcher
from sllm.etcd import Etcd
from sllm.sse import parse_events


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a fresh etcd server for the whole test session."""
    data = tmp_path_factory.mktemp("etcd")
    client, peer = launcher.free_ports(2)
    h = "127.0.0.1"
    proc = launcher.spawn("etcd", [str(launcher.etcd_binary()), "--name", "test", "--data-dir", str(data / "data"),
         "--listen-client-urls", f"http://{h}:{client}", "--advertise-client-urls", f"http://{h}:{client}",
         "--listen-peer-urls", f"http://{h}:{peer}", "--initial-advertise-peer-urls", f"http://{h}:{peer}",
         "--initial-cluster", f"test=http://{h}:{peer}", "--log-level", "error"], data, stop_at_exit=True)
    try:
        launcher.wait_healthy(f"http://{h}:{client}/health", proc, data / "etcd.log", timeout=30)
        yield f"{h}:{client}"
    finally:
        launcher.stop_pid(proc.pid)


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[Etcd]:
    """A client of the session's etcd server."""
    async with Etcd(etcd_endpoint) as client:
        yield client


@dataclass
class Cluster:
    """A running embedded runtime for tests."""

    state: launcher.RuntimeState
    home: Path
    store: Path

    @property
    def gateway(self) -> str:
        return self.state.gateway_url

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.gateway, timeout=120.0, **kwargs)  # type: ignore[arg-type]

    def deploy(self, manifest: dict[str, object]) -> dict[str, object]:
        """Create or replace a function through the gateway; returns the function view."""
        name = manifest["metadata"]["name"]  # type: ignore[index]
        with self.client() as c:
            r = c.put(f"/v1/functions/{name}", json=manifest)
            assert r.status_code in (200, 201), r.text
            return r.json()  # type: ignore[no-any-return]


def start_cluster(
    home: Path, *, invokers: int = 1, tick_s: float = 0.2, memory: str = "8Gi", dram_pool: str = "64Mi",
    controllers: int = 1, **options: Any,
) -> Cluster:
    """Start a runtime on free ports with its store root under ``home/models``; ``options`` go
    to :func:`cli.launcher.start` (lease TTLs, placement policy). Replication is off unless
    ``replication=True`` is passed: most tests pin where checkpoints are (one copy per load),
    and background copies would move them under the test."""
    options.setdefault("replication", False)
    store = home / "models"
    gateway, etcd, peer, *ports = launcher.free_ports(3 + controllers + invokers)
    state = launcher.start(
        home, invokers=invokers, gateway_port=gateway,
        controller_ports=ports[:controllers], controllers=controllers,
        etcd_port=etcd, etcd_peer_port=peer,
        invoker_ports=ports[controllers:], store=store, tick_s=tick_s,
        invoker_memory=memory, dram_pool=dram_pool, stop_at_exit=True, **options,
    )
    return Cluster(state=state, home=home, store=store)


def stream(cluster: Cluster, function: str, on_token: Callable[[int], object] | None = None, *,
           stop: threading.Event | None = None, **body: Any) -> dict[str, Any]:
    """Invoke ``function`` with streaming (``body``: more request fields; the prompt defaults
    to "The quick brown fox"). ``on_token(n)`` runs after the n-th token; once ``stop`` is set,
    the next token closes the stream (which cancels the generation). Returns ``{"tokens",
    "done", "error"}``."""
    out: dict[str, Any] = {"tokens": [], "done": None, "error": None}
    with httpx.Client(base_url=cluster.gateway, timeout=120) as c, \
            c.stream("POST", f"/v1/functions/{function}/invoke",
                     json={"prompt": "The quick brown fox", "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        for event, data in parse_events(r.iter_lines()):
            if event == "token":
                out["tokens"].append(data)
                if on_token is not None:
                    on_token(len(out["tokens"]))
                if stop is not None and stop.is_set():
                    break
            else:
                out[event] = data
    return out


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``predicate`` every 0.1 s until it returns something truthy, and return that.
    Raises AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := predicate():
            return got
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


def manifest(name: str, model: str, **spec: object) -> dict[str, object]:
    """A function manifest as a dict; ``spec`` entries (scaling, generation, ...) override."""
    body: dict[str, object] = {
        "model": model,
        "resources": {"device": "auto", "memory": "256Mi"},
        "scaling": {"minInstances": 0, "maxInstances": 1, "targetConcurrency": 1, "keepAlive": "60s"},
        "generation": {"maxTokens": 16, "temperature": 0.0},
    }
    body.update(spec)
    return {"apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name}, "spec": body}
