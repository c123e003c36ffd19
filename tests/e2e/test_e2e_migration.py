"""Live migration end to end on a real cluster (three invokers, room for one instance each):
a stream keeps going through a migration with exactly the tokens of a run without one (greedy),
at several points of the generation; a migration racing the generation's end; a destination
that fails (the source goes on); a migration's destination chosen by the operator; streams under
load while instances migrate under them; and kill -9 of the invoker under a stream (the gateway
resumes elsewhere and the client gets the complete text).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sllm.sse import parse_events
from tests.helpers.cluster import Cluster, manifest, running_cluster, wait_for
from tests.helpers.tiny_model import save_tiny_llama

PROMPT = "The quick brown fox"
N = 200  # tokens per generation: a few seconds on the slow tiny model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # hidden 384, 4 layers: slow enough that a generation of N tokens runs for seconds
    src = save_tiny_llama(tmp_path_factory.mktemp("src") / "slow", seed=2, hidden_size=384,
                          num_hidden_layers=4)
    mig = manifest("mig", "tiny-slow", scaling={
        "minInstances": 2, "maxInstances": 2, "targetConcurrency": 1, "keepAlive": "600s"},
        generation={"maxTokens": N, "temperature": 0.0})
    with running_cluster(tmp_path_factory.mktemp("home"), models={"tiny-slow": src},
                         functions=[mig], invokers=3, memory="300Mi", invoker_lease_ttl=3) as c:
        with c.client() as client:
            wait_for(lambda: len(loaded(client)) == 2, timeout=60)
        yield c


def loaded(c: httpx.Client, function: str = "mig") -> list[dict[str, Any]]:
    return [i for i in c.get("/v1/instances").json()["instances"]
            if i["function"] == function and i["state"] in ("idle", "active")]


class Stream:
    """A streaming invocation read in a thread; ``on_token(n)`` runs after the n-th token.
    ``opened`` is set once the response's headers arrive, before any token (a migration "at 0"
    waits for it), hence raw HTTP here rather than the gateway client's events."""

    def __init__(self, gateway: str, body: dict[str, Any], on_token: Any = None) -> None:
        self.tokens: list[dict[str, Any]] = []
        self.done: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.instance_id: str | None = None
        self._gateway, self._body, self._on_token = gateway, body, on_token
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        body = {**self._body, "stream": True}
        with httpx.Client(base_url=self._gateway, timeout=120) as c, \
                c.stream("POST", "/v1/functions/mig/invoke", json=body) as r:
            assert r.status_code == 200, r.read()
            self.opened.set()
            for event, data in parse_events(r.iter_lines()):
                if event == "token":
                    self.tokens.append(data)
                    if self._on_token is not None:
                        self._on_token(len(self.tokens))
                elif event == "done":
                    self.done = data
                elif event == "error":
                    self.error = data

    def result(self, timeout: float = 120) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.error is None, self.error
        assert self.done is not None
        assert [t["index"] for t in self.tokens] == list(range(len(self.tokens)))  # none lost or repeated
        assert "".join(t["text"] for t in self.tokens) == self.done["text"]
        return self.done


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> dict[str, Any]:
    """The greedy answer without any migration."""
    done = Stream(cluster.gateway, {"prompt": PROMPT}).result()
    assert done["migrations"] == [] and done["usage"]["completion_tokens"] > 100
    return {"text": done["text"], "usage": done["usage"]}


def running_instance(c: httpx.Client) -> dict[str, Any]:
    return wait_for(lambda: next((i for i in loaded(c) if i["state"] == "active"), None), 10)


def migrate(c: httpx.Client, instance_id: str, to: str | None = None) -> httpx.Response:
    return c.post(f"/v1/instances/{instance_id}/migrate", json={"to": to} if to else {})


SAMPLED = {"temperature": 0.9, "seed": 1234}


@pytest.fixture(scope="module")
def sampled_reference(cluster: Cluster) -> dict[str, Any]:
    """The answer sampled with a seed, without any migration."""
    done = Stream(cluster.gateway, {"prompt": PROMPT, **SAMPLED}).result()
    assert done["migrations"] == [] and done["usage"]["completion_tokens"] > 100
    return {"text": done["text"], "usage": done["usage"]}


@pytest.mark.parametrize(("at", "sampled"), [(0, False), (30, False), (30, True)])
def test_migration_mid_stream_keeps_the_text(cluster: Cluster, reference: dict[str, Any],
                                             sampled_reference: dict[str, Any], at: int,
                                             sampled: bool) -> None:
    """Moved before the first token (the call is made as soon as the stream opens) and in the
    middle: the client sees one unbroken stream with the text of a run without migration, greedy
    or sampled with the same seed."""
    body = {"prompt": PROMPT, **(SAMPLED if sampled else {})}
    reference = sampled_reference if sampled else reference
    answers: list[httpx.Response] = []
    go = threading.Event()

    def on_token(n: int) -> None:
        if n == at:
            go.set()

    stream = Stream(cluster.gateway, body, on_token)
    with cluster.client() as c:
        assert stream.opened.wait(30)
        if at:
            assert go.wait(30)
        source = running_instance(c)
        others = [i for i in loaded(c) if i["id"] != source["id"]]
        answers.append(migrate(c, source["id"]))
        done = stream.result()
        assert answers[0].status_code == 200, answers[0].text
        moved = answers[0].json()
        assert moved["moved"] == 1 and moved["to_instance"] == others[0]["id"]  # the idle one
        assert done["text"] == reference["text"] and done["usage"] == reference["usage"]
        [m] = done["migrations"]
        assert m["reason"] == "migrated" and m["from_instance"] == source["id"]
        assert m["to_instance"] == moved["to_instance"] == done["instance_id"]
        assert m["at_token"] >= at and m["pause_seconds"] is not None
        assert m["kv_cache_prepared"] == (moved["tokens"] > 0)
        # the source drained and stopped; the destination serves; the function is whole again
        wait_for(lambda: source["id"] not in {i["id"] for i in loaded(c)})
        wait_for(lambda: len(loaded(c)) == 2, timeout=60)  # minInstances starts another
        record = c.get(f"/v1/activations/{done['activation_id']}").json()
        assert record["status"] == "success" and record["migrations"] == done["migrations"]
        metrics = c.get("/metrics").text
        assert 'sllm_stream_moves_total{function="mig",reason="migrated"}' in metrics
        assert 'sllm_stream_move_pause_seconds_count{function="mig",reason="migrated"}' in metrics


def test_migration_racing_the_end_of_the_generation(cluster: Cluster,
                                                    reference: dict[str, Any]) -> None:
    """Asked a few tokens before the end: either the generation finishes first or it moves;
    the client's text is the same either way."""
    total = reference["usage"]["completion_tokens"]
    go = threading.Event()
    stream = Stream(cluster.gateway, {"prompt": PROMPT},
                    lambda n: go.set() if n == total - 3 else None)
    with cluster.client() as c:
        assert go.wait(60)
        # one look: the generation may end any moment, so no waiting for an active instance
        source = next((i for i in loaded(c) if i["state"] == "active"), None)
        r = migrate(c, source["id"]) if source else None
        done = stream.result()
        assert done["text"] == reference["text"]
        if r is not None and r.status_code == 200:
            assert r.json()["moved"] + r.json()["finished"] <= 1
            assert len(done["migrations"]) == r.json()["moved"]
        wait_for(lambda: len(loaded(c)) == 2, timeout=60)


def test_a_failing_destination_leaves_the_stream_on_the_source(
        cluster: Cluster, reference: dict[str, Any]) -> None:
    """The source's invoker is told to migrate to an instance that does not exist: the first
    prefill round fails, the migration is abandoned (502 migration_failed) and the generation
    goes on where it was."""
    go = threading.Event()
    stream = Stream(cluster.gateway, {"prompt": PROMPT}, lambda n: go.set() if n == 20 else None)
    with cluster.client() as c:
        assert go.wait(30)
        source = running_instance(c)
        other = next(i for i in loaded(c) if i["id"] != source["id"])
        with httpx.Client(timeout=30) as direct:
            r = direct.post(f"{source['invoker_url']}/v1/instances/{source['id']}/migrate",
                            json={"to_url": other["invoker_url"], "to_instance": "no-such-instance"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "migration_failed"
        done = stream.result()
        assert done["text"] == reference["text"] and done["migrations"] == []
        assert done["instance_id"] == source["id"]


def test_operator_migration_to_a_named_invoker_and_bad_requests(cluster: Cluster) -> None:
    with cluster.client() as c:
        insts = loaded(c)
        used = {i["invoker_id"] for i in insts}
        free = next(f"invoker-{k}" for k in range(3) if f"invoker-{k}" not in used)
        idle = insts[0]
        r = migrate(c, idle["id"], to=idle["invoker_id"])
        assert r.status_code == 409  # to its own invoker
        assert migrate(c, "no-such-instance").status_code == 404
        for bad in (b"{not json", b'{"to": 3}'):  # refused with 400 by the gateway and the controller
            assert c.post(f"/v1/instances/{idle['id']}/migrate", content=bad).status_code == 400
            r = httpx.post(f"{cluster.state.controller_url}/v1/instances/{idle['id']}/migrate",
                           content=bad)
            assert r.status_code == 400, r.text
        r = migrate(c, idle["id"], to=free)  # an idle instance: moved with nothing running
        assert r.status_code == 200, r.text
        assert r.json()["to_invoker"] == free and r.json()["moved"] == 0
        wait_for(lambda: free in {i["invoker_id"] for i in loaded(c)} and len(loaded(c)) == 2)


def test_streams_under_load_while_instances_migrate(cluster: Cluster,
                                                    reference: dict[str, Any]) -> None:
    """Eight streams through two instances while an operator keeps migrating whatever runs:
    every stream is complete, in order, and has the text of a run without migration."""
    stop = threading.Event()
    moves: list[int] = []

    def migrator() -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=cluster.gateway, timeout=60) as c:
            while not stop.is_set():
                active = [i for i in loaded(c) if i["state"] == "active"]
                if active:
                    r = migrate(c, rng.choice(active)["id"])
                    if r.status_code == 200:
                        moves.append(r.json()["moved"])
                time.sleep(0.3)

    m = threading.Thread(target=migrator, daemon=True)
    m.start()
    try:
        streams = []
        for _ in range(8):
            streams.append(Stream(cluster.gateway, {"prompt": PROMPT}))
            time.sleep(0.2)
        results = [s.result(timeout=180) for s in streams]
    finally:
        stop.set()
        m.join(60)
    bad = [r["migrations"] for r in results if r["text"] != reference["text"]]
    assert not bad, bad
    assert sum(moves) >= 1 and sum(len(r["migrations"]) for r in results) >= 1


def test_kill_9_of_the_invoker_under_a_stream(cluster: Cluster, reference: dict[str, Any]) -> None:
    """The invoker serving a stream dies: the gateway resumes the generation on another
    instance from the tokens it relayed, and the client gets the complete, correct text. (Last
    in this module: it leaves the cluster an invoker short.)"""
    go = threading.Event()
    stream = Stream(cluster.gateway, {"prompt": PROMPT}, lambda n: go.set() if n == 40 else None)
    with cluster.client() as c:
        assert go.wait(30)
        source = running_instance(c)
        pid = next(p.pid for p in cluster.state.processes if p.name == source["invoker_id"])
        os.kill(pid, signal.SIGKILL)
        done = stream.result()
        assert done["text"] == reference["text"]
        [m] = done["migrations"]
        assert m["reason"] == "failed" and m["from_instance"] == source["id"]
        assert m["at_token"] >= 40 and m["to_instance"] == done["instance_id"] != source["id"]
        lost = wait_for(lambda: next((i for i in c.get("/v1/instances").json()["instances"]
                                      if i["id"] == source["id"] and i["state"] == "lost"), None))
        assert "unreachable" in lost["reason"] or "lease" in lost["reason"]
