"""Fixtures shared by every test: a real etcd server on an ephemeral loopback port, for the
whole session, and clients of it. Helpers (the cluster factory, the tiny model, ...) are in
:mod:`tests.helpers`; no test imports from here.

Every process a fixture starts is stopped in its ``finally``, so a failing test never leaves
etcd behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from cli import launcher
from sllm.etcd import Etcd


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
