"""What the engine benchmark's parts through the runtime share: a runtime of their own on free
loopback ports, and a one-instance function per scheduling policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cli import launcher
from sllm import config


@contextmanager
def runtime(home: Path) -> Iterator[str]:
    """Etcd, a controller, the gateway and one invoker on free loopback ports, with ``home`` for
    their state, over the model store of ``$SLLM_HOME``; yields the gateway's URL and stops them
    all on the way out."""
    gport, cport, eport, pport, iport = launcher.free_ports(5)
    state = launcher.start(home, gateway_port=gport, controller_port=cport, etcd_port=eport,
                           etcd_peer_port=pport, invoker_ports=[iport], store=config.store_root(),
                           dram_pool="2Gi", stop_at_exit=True)
    try:
        yield state.gateway_url
    finally:
        launcher.stop(state)


def deploy(gateway: str, name: str, model: str, policy: str, batch: int, tokens: int, *,
           target: int | None = None) -> None:
    """Deploy function ``name``: one instance of ``model`` (2 GiB) under ``policy`` with
    ``maxBatch`` ``batch``, holding ``target`` calls at once (default ``batch``), greedy, at most
    ``tokens`` tokens a call."""
    manifest = {
        "apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
        "spec": {"model": model, "resources": {"memory": "2Gi"},
                 "scaling": {"maxInstances": 1, "targetConcurrency": target or batch,
                             "keepAlive": "10m"},
                 "generation": {"maxTokens": tokens, "temperature": 0.0},
                 "scheduling": {"policy": policy, "maxBatch": batch}},
    }
    httpx.put(f"{gateway}/v1/functions/{name}", json=manifest, timeout=30).raise_for_status()


def delete(gateway: str, name: str) -> None:
    """Delete function ``name`` (its instance stops, cancelling what it still runs)."""
    httpx.delete(f"{gateway}/v1/functions/{name}", timeout=30)
