"""Real runtimes for end-to-end tests: etcd, controllers, gateway and invokers, each its own
process on free loopback ports (:mod:`cli.launcher`), under a test's own home folder.

:func:`running_cluster` is the one factory: it imports the models into the store root, starts
the runtime, deploys the functions, and always stops every process it started, so a failing test
never leaves one behind. A test that needs a runtime for its whole module wraps it in a
module-scoped fixture::

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        src = tmp_path_factory.mktemp("src")
        with running_cluster(tmp_path_factory.mktemp("home"),
                             models={"tiny-llama": save_tiny_llama(src / "tiny", seed=0)},
                             functions=[manifest("tiny", "tiny-llama")], invokers=2) as c:
            yield c
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from cli import launcher
from sllm.client import GatewayClient
from store.importer import import_model
from store.model_store import ModelStore


@dataclass
class Cluster:
    """A running embedded runtime for tests."""

    state: launcher.RuntimeState
    home: Path
    store: Path
    """The store root models are imported into (``home/models``)."""

    @property
    def gateway(self) -> str:
        return self.state.gateway_url

    def client(self) -> httpx.Client:
        """A raw HTTP client of the gateway, for tests of statuses, headers and bodies."""
        return httpx.Client(base_url=self.gateway, timeout=120.0)

    def api(self) -> GatewayClient:
        """The gateway's client (:class:`sllm.client.GatewayClient`): errors raised as the
        :mod:`sllm.errors` the gateway answered."""
        return GatewayClient(self.gateway)

    def deploy(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a function through the gateway; returns the function view."""
        with self.api() as api:
            return api.deploy(manifest)


def start_cluster(
    home: Path, *, invokers: int = 1, tick_s: float = 0.2, memory: str = "8Gi", dram_pool: str = "64Mi",
    controllers: int = 1, **options: Any,
) -> Cluster:
    """Start a runtime on free ports with its store root under ``home/models``; ``options`` go
    to :func:`cli.launcher.start` (lease TTLs, placement policy). Replication is off unless
    ``replication=True`` is passed: most tests pin where checkpoints are (one copy per load),
    and background copies would move them under the test. The caller stops it
    (``launcher.stop(cluster.state)``); :func:`running_cluster` does."""
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


@contextlib.contextmanager
def running_cluster(
    home: Path, *, models: Mapping[str, Path | str] | None = None,
    functions: Iterable[dict[str, Any]] = (), **options: Any,
) -> Iterator[Cluster]:
    """A runtime under ``home``, stopped when the block ends, however it ends.

    Args:
        home: the runtime's home folder (its store root is ``home/models``).
        models: model name -> what to import under it (a Hugging Face folder, a ``.gguf``
            file; :func:`store.importer.import_model`), imported before the runtime starts.
        functions: manifests (:func:`manifest`) deployed once it runs.
        options: :func:`start_cluster`'s (invokers, memory, dram_pool, controllers) and
            :func:`cli.launcher.start`'s (lease TTLs, placement, migration, replication, ...).
    """
    store = ModelStore(home / "models")
    for name, source in (models or {}).items():
        import_model(str(source), store, name=name)
    cluster = start_cluster(home, **options)
    try:
        for body in functions:
            cluster.deploy(body)
        yield cluster
    finally:
        launcher.stop(cluster.state)


def stream(cluster: Cluster, function: str, on_token: Callable[[int], object] | None = None, *,
           stop: threading.Event | None = None, **body: Any) -> dict[str, Any]:
    """Invoke ``function`` with streaming (``body``: more request fields; the prompt defaults
    to "The quick brown fox"). ``on_token(n)`` runs after the n-th token; once ``stop`` is set,
    the next token closes the stream (which cancels the generation). Returns ``{"tokens",
    "done", "error"}``."""
    out: dict[str, Any] = {"tokens": [], "done": None, "error": None}
    with cluster.api() as api:
        # a generator: closing it closes the response, which cancels the generation
        events = cast(Generator[tuple[str, Any], None, None], api.invoke_stream(
            function, **{"prompt": "The quick brown fox", **body}))
        with contextlib.closing(events):
            for event, data in events:
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


def manifest(name: str, model: str, **spec: object) -> dict[str, Any]:
    """A function manifest as a dict; ``spec`` entries (scaling, generation, ...) override,
    ``scaling`` field by field over these tests' defaults (one call per instance at a time,
    ``targetConcurrency: 1``, unless a test says otherwise)."""
    scaling = {"minInstances": 0, "maxInstances": 1, "targetConcurrency": 1, "keepAlive": "60s"}
    given = spec.pop("scaling", {})
    body: dict[str, object] = {
        "model": model,
        "resources": {"device": "auto", "memory": "256Mi"},
        "scaling": {**scaling, **given} if isinstance(given, dict) else given,
        "generation": {"maxTokens": 16, "temperature": 0.0},
    }
    body.update(spec)
    return {"apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name}, "spec": body}
