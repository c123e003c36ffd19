"""End to end on a tiny random-weight llama: a real etcd, controller, gateway and invoker, each its
own process on loopback; functions deployed and invoked over HTTP, through the native API, both
OpenAI endpoints (with the official ``openai`` client) and the CLI.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway.openai import NO_OP_FIELDS, REFUSED_FIELDS
from sllm import keys
from sllm.etcd import Etcd
from sllm.messages import InstanceRecord
from sllm.sse import parse_events
from tests.helpers.cluster import Cluster, manifest, running_cluster, wait_for
from tests.helpers.tiny_model import save_tiny_llama

MODEL = "tiny-llama"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama as a Hugging Face folder (seed 0: no EOS within 150 tokens of greedy
    output on the prompts used here)."""
    return save_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", seed=0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, src: Path) -> Iterator[Cluster]:
    # seed 1 answers PROMPT with an EOS before 100 tokens
    eos = save_tiny_llama(tmp_path_factory.mktemp("src") / "eos", seed=1)
    functions = [manifest("tiny", MODEL), manifest("tiny-eos", "tiny-eos")]
    with running_cluster(tmp_path_factory.mktemp("home"), models={MODEL: src, "tiny-eos": eos},
                         functions=functions) as c:
        yield c


@pytest.fixture(scope="module")
def reference(src: Path) -> Any:
    """transformers' own greedy generate on the same weights."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)

    def generate(*, messages: list[dict[str, str]] | None = None, prompt: str | None = None,
                 max_new_tokens: int = 16) -> list[int]:
        if messages is not None:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        return [t for t in new if t != tok.eos_token_id]

    generate.tokenizer = tok  # type: ignore[attr-defined]
    return generate


class OneConnection:
    """HTTP/1.1 requests on one kept-alive connection: each request checks that the connection
    is still the first one (the same local port) and that the server did not close it, so an
    error answered and then followed by a reset fails the next request."""

    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url)
        self._conn = http.client.HTTPConnection(url.host, url.port, timeout=120)
        self._port: int | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, bytes]:
        """Send one request; returns its status and whole body."""
        headers = {"Content-Type": content_type or "application/json"} if body is not None else {}
        self._conn.request(method, path, body=body, headers=headers)
        r = self._conn.getresponse()
        data = r.read()
        assert not r.will_close, f"the server closed the connection after {r.status}"
        assert self._conn.sock is not None
        port = self._conn.sock.getsockname()[1]
        self._port = self._port or port
        assert port == self._port, "the request went on a new connection"
        return r.status, data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()


def sse(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, data) pairs of a Server-Sent Events response."""
    return list(parse_events(response.iter_lines()))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_streamed_tokens_equal_transformers_greedy_generate(cluster: Cluster, reference: Any) -> None:
    want = reference(messages=user(PROMPT))
    with cluster.client() as c, c.stream("POST", "/v1/functions/tiny/invoke",
                                         json={"prompt": PROMPT, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-activation-id"]
        events = sse(r)
    tokens = [d for e, d in events if e == "token"]
    assert [t["token_id"] for t in tokens] == want
    assert [t["index"] for t in tokens] == list(range(len(want)))
    done = events[-1]
    assert done[0] == "done"
    assert done[1]["text"] == "".join(t["text"] for t in tokens)
    assert done[1]["text"] == reference.tokenizer.decode(want, skip_special_tokens=True)
    assert done[1]["usage"]["completion_tokens"] == len(want)
    t = done[1]["timings"]
    assert t["ttft_seconds"] > 0 and t["total_seconds"] >= t["ttft_seconds"]


def test_non_streaming_invoke_returns_one_json_body(cluster: Cluster, reference: Any) -> None:
    want = reference(messages=user("Tell me a story"), max_new_tokens=8)
    with cluster.client() as c:
        r = c.post("/v1/functions/tiny/invoke",
                   json={"messages": user("Tell me a story"), "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == reference.tokenizer.decode(want, skip_special_tokens=True)
    assert body["finish_reason"] == ("length" if len(want) == 8 else "stop")
    assert body["usage"]["completion_tokens"] == len(want)
    assert body["activation_id"] == r.headers["x-activation-id"]
    assert body["timings"]["start"] in ("cold", "warm")


def test_first_call_is_cold_then_warm(cluster: Cluster) -> None:
    cluster.deploy(manifest("tiny-cold", MODEL))
    with cluster.client() as c:
        first = c.post("/v1/functions/tiny-cold/invoke", json={"prompt": "hi", "max_tokens": 2}).json()
        second = c.post("/v1/functions/tiny-cold/invoke", json={"prompt": "hi", "max_tokens": 2}).json()
    assert first["timings"]["cold_start"] is True and first["timings"]["load_seconds"] > 0
    assert second["timings"]["cold_start"] is False and second["timings"]["load_seconds"] == 0
    assert first["text"] == second["text"]


def test_openai_client_chat_completions(cluster: Cluster, reference: Any) -> None:
    want = reference.tokenizer.decode(reference(messages=user(PROMPT), max_new_tokens=12),
                                      skip_special_tokens=True)
    client = openai.OpenAI(base_url=f"{cluster.gateway}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="tiny", messages=user(PROMPT), max_tokens=12)  # type: ignore[arg-type]
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == want
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="tiny", messages=user(PROMPT), max_tokens=12, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_openai_client_completions_use_the_raw_prompt(cluster: Cluster, reference: Any) -> None:
    want = reference.tokenizer.decode(reference(prompt="The quick brown", max_new_tokens=10),
                                      skip_special_tokens=True)
    client = openai.OpenAI(base_url=f"{cluster.gateway}/v1", api_key="unused", max_retries=0)
    resp = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == want
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=10, stream=True))
    assert text == want


def test_ignore_eos_generates_max_tokens_on_both_apis(cluster: Cluster) -> None:
    with cluster.client() as c:
        plain = c.post("/v1/functions/tiny-eos/invoke",
                       json={"prompt": PROMPT, "max_tokens": 100}).json()
        assert plain["finish_reason"] == "stop"
        n = plain["usage"]["completion_tokens"] + 3
        through = c.post("/v1/functions/tiny-eos/invoke",
                         json={"prompt": PROMPT, "max_tokens": n, "ignore_eos": True}).json()
    assert through["finish_reason"] == "length" and through["usage"]["completion_tokens"] == n
    assert through["text"].startswith(plain["text"])
    client = openai.OpenAI(base_url=f"{cluster.gateway}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="tiny-eos", messages=user(PROMPT), max_tokens=n,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length" and resp.usage is not None
    assert resp.usage.completion_tokens == n and resp.choices[0].message.content == through["text"]


def test_openai_developer_role_is_a_system_message(cluster: Cluster, reference: Any) -> None:
    turns = [{"role": "system", "content": "Be brief."}, *user(PROMPT)]
    want = reference.tokenizer.decode(reference(messages=turns, max_new_tokens=6), skip_special_tokens=True)
    with cluster.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 6,
            "messages": [{"role": "developer", "content": "Be brief."}, *user(PROMPT)]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want


def test_openai_stream_ends_with_done(cluster: Cluster) -> None:
    with cluster.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": user("hi"), "max_tokens": 3, "stream": True}) as r:
        events = sse(r)
    assert events[-1] == ("message", "[DONE]")


def test_an_idle_client_connection_outlasts_the_clients_own_keep_alive(cluster: Cluster) -> None:
    """A client's keep-alive connection, idle for 6 s (longer than httpx's and so the OpenAI
    SDK's 5 s expiry), still carries the next request: the gateway does not close it first.
    With uvicorn's default (5 s) the server closes it, and a request sent at that moment fails
    with a read error (GATEWAY_KEEPALIVE_S)."""
    url = httpx.URL(cluster.gateway)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        port = conn.sock.getsockname()[1]
        time.sleep(6.0)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and r.read()
        assert conn.sock.getsockname()[1] == port  # the same connection, not a new one
    finally:
        conn.close()


def test_models_lists_functions_in_openai_shape(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.gateway}/v1", api_key="unused", max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert "tiny" in ids
    with cluster.client() as c:
        body = c.get("/v1/models").json()
    assert body["object"] == "list"
    assert all(set(m) == {"id", "object", "created", "owned_by"} for m in body["data"])


def test_openai_unknown_model_is_a_404_error(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.gateway}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=user("hi"))  # type: ignore[arg-type]
    assert "nope" in str(e.value)


BAD_YAML = "apiVersion: sllm.dev/v1\nkind: Function\nmetadata: {name: bad\nspec: {model: x}\n"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        ("PUT", "/v1/functions/bad", {"content": BAD_YAML, "headers": {"content-type": "application/yaml"}},
         422, "malformed YAML"),
        ("PUT", "/v1/functions/x", {"json": {**manifest("x", MODEL), "extra": 1}}, 422, "extra: unknown field"),
        ("PUT", "/v1/functions/x", {"json": manifest("x", MODEL, generation={"maxTokens": "many"})},
         422, "spec.generation.maxTokens"),
        ("PUT", "/v1/functions/x", {"json": manifest("x", MODEL, scaling={"minInstances": -1})},
         422, "spec.scaling.minInstances"),
        ("PUT", "/v1/functions/x", {"json": manifest("x", "no-such-model")}, 422, "no model named"),
        ("PUT", "/v1/functions/y", {"json": manifest("x", MODEL)}, 400, "does not match"),
        ("POST", "/v1/functions/nope/invoke", {"json": {"prompt": "hi"}}, 404, "no function named"),
        ("GET", "/v1/functions/nope", {}, 404, "no function named"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"prompt": "   "}}, 400, "prompt: must not be empty"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"messages": []}}, 400, "messages: must not be empty"),
        ("POST", "/v1/functions/tiny/invoke", {"content": b"{not json", "headers": {"content-type": "application/json"}},
         400, "not valid JSON"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"prompt": "hi", "max_tokens": 0}}, 400, "max_tokens"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"prompt": "hi", "bogus": 1}}, 400, "bogus: unknown field"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"prompt": "word " * 400}}, 400, "context window"),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": user("hi"), "n": 17}}, 400,
         "n: "),
        ("POST", "/v1/chat/completions",
         {"json": {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}}, 400, "tool messages"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"messages": [{"role": "wizard", "content": "x"}]}},
         400, "messages.0.role"),
        # found by a fuzz of the gateway: a whitespace prompt on the OpenAI endpoints was a 500
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": " "}}, 400, "prompt: must not be empty"),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": [" \n\t"]}}, 400,
         "prompt: must not be empty"),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": ["a", "b"]}}, 400, "one prompt"),
        ("POST", "/v1/functions/tiny/invoke", {"json": {"prompt": "\n \t"}}, 400, "prompt: must not be empty"),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": []}}, 400, "messages"),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": user("hi"), "bogus": 1}},
         400, "bogus: unrecognized request argument"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_runtime_keeps_serving(
    cluster: Cluster, method: str, path: str, kwargs: dict[str, Any], status: int, needle: str
) -> None:
    """Each refusal is in the OpenAI error envelope, and the connection it came on carries the
    next request (an unhandled error used to reset it)."""
    body = kwargs.get("content", json.dumps(kwargs["json"]).encode() if "json" in kwargs else None)
    with OneConnection(cluster.gateway) as conn:
        got, data = conn.request(method, path, body, kwargs.get("headers", {}).get("content-type"))
        assert got == status, data
        err = json.loads(data)["error"]
        assert needle in err["message"]
        assert err["type"] and err["code"]
        ok, _ = conn.request("POST", "/v1/functions/tiny/invoke",
                             json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
        assert ok == 200


ANSWER_CHANGING = {
    "min_p": 0.1, "response_format": {"type": "json_object"},
    "tool_choice": "auto", "suffix": " the end",
    "echo": True, "logit_bias": {"50": 100}, "best_of": 2,
    "tools": [{"type": "function", "function": {"name": "f"}}],
}
HONOURED = {
    "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2, "top_k": 40,
    "min_tokens": 4, "stop": ["\n"],
}
NEUTRAL = {
    "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1, "top_k": -1,
    "min_tokens": 0, "response_format": {"type": "text"}, "tool_choice": "none", "suffix": "",
    "stop": None, "n": 1, "user": "someone", "metadata": {"team": "a"},
}


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_fields_that_would_change_the_answer_are_refused_by_name(cluster: Cluster, endpoint: str) -> None:
    """Each field the engine does not honour yet is a 400 naming it (``param``), never accepted
    and ignored; the same fields at their neutral value, and fields that change nothing
    (``user``, ``metadata``), are accepted."""
    base: dict[str, Any] = {"model": "tiny", "max_tokens": 2}
    base.update({"messages": user("hi")} if "chat" in endpoint else {"prompt": "hi"})
    with OneConnection(cluster.gateway) as conn:
        for field, value in ANSWER_CHANGING.items():
            status, data = conn.request("POST", endpoint, json.dumps({**base, field: value}).encode())
            assert status == 400, (field, data)
            err = json.loads(data)["error"]
            assert err["param"] == field and err["message"].startswith(f"{field}: "), err
            assert err["type"] == "invalid_request_error"
        status, data = conn.request("POST", endpoint, json.dumps({**base, **NEUTRAL}).encode())
        assert status == 200, data
        assert json.loads(data)["usage"]["completion_tokens"] == 2
        logprobs = {"logprobs": True, "top_logprobs": 3} if "chat" in endpoint else {"logprobs": 3}
        for fields in [*({k: v} for k, v in HONOURED.items()), logprobs]:  # honoured now
            status, data = conn.request("POST", endpoint, json.dumps({**base, **fields}).encode())
            assert status == 200, (fields, data)


def test_log_probabilities_in_each_apis_shape_streamed_or_not(cluster: Cluster) -> None:
    """Greedy tokens with their log probabilities and top 3: the chosen token is the most
    likely, the list is sorted, the streamed chunks carry what the whole answer does; chat's
    shape (``logprobs.content``) and completions' legacy one (``tokens``, ``token_logprobs``,
    ``top_logprobs``, ``text_offset``); the native API's per token event. ``top_logprobs``
    without ``logprobs`` is refused."""
    def chunks(c: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        with c.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            return [json.loads(line[len("data: "):]) for line in r.iter_lines()
                    if line.startswith("data: {")]

    chat = {"model": "tiny", "messages": user("hi"), "max_tokens": 6, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 3}
    legacy = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "logprobs": 3}
    with cluster.client() as c:
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        content = choice["logprobs"]["content"]
        assert len(content) == 6
        for entry in content:
            tops = [t["logprob"] for t in entry["top_logprobs"]]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
            assert (entry["token"], entry["logprob"]) == (
                entry["top_logprobs"][0]["token"], tops[0])  # greedy: the most likely
            assert entry["bytes"] == list(entry["token"].encode())
        streamed = [lp for ch in chunks(c, "/v1/chat/completions", chat)
                    if (lp := ch["choices"][0]["logprobs"])]
        assert [e for lp in streamed for e in lp["content"]] == content

        r = c.post("/v1/completions", json=legacy)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert all(max(top.values()) == chosen and len(top) <= 3
                   for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True))
        parts = [ch["choices"][0]["logprobs"] for ch in chunks(c, "/v1/completions", legacy)]
        assert [t for p in parts if p for t in p["token_logprobs"]] == lp["token_logprobs"]
        assert [o for p in parts if p for o in p["text_offset"]] == lp["text_offset"]

        r = c.post("/v1/functions/tiny/invoke",
                   json={"prompt": PROMPT, "raw": True, "max_tokens": 6, "ignore_eos": True,
                         "logprobs": 2})
        assert r.status_code == 200, r.text
        assert [e["logprob"] for e in r.json()["logprobs"]] == lp["token_logprobs"]
        assert all(len(e["top"]) == 2 for e in r.json()["logprobs"])

        r = c.post("/v1/chat/completions", json={**chat, "logprobs": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_before_it_on_both_apis(
        cluster: Cluster, reference: Any, stream: bool) -> None:
    """A stop string spanning a token boundary of the greedy answer: the text (whole or
    streamed) is the answer's text before it, and the finish reason is stop."""
    tok = reference.tokenizer
    want = reference(prompt=PROMPT, max_new_tokens=30)
    pieces = [tok.decode(want[:i], skip_special_tokens=True) for i in range(len(want) + 1)]
    full = pieces[-1]
    cut = len(pieces[12])
    stop = full[cut - 2:cut + 2]
    before = full[:full.find(stop)]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "stop": stop, "stream": stream}
    with cluster.client() as c:
        if not stream:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            [choice] = r.json()["choices"]
            assert (choice["text"], choice["finish_reason"]) == (before, "stop")
        else:
            with c.stream("POST", "/v1/completions", json=body) as r:
                chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                          if line.startswith("data: {")]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == before
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    native = {"prompt": PROMPT, "raw": True, "max_tokens": 30, "stop": [stop]}
    with cluster.client() as c:
        r = c.post("/v1/functions/tiny/invoke", json=native)
    assert r.status_code == 200 and r.json()["text"] == before, r.text


FIELDS = sorted({"model", "prompt", "messages", "raw", "max_tokens", "max_completion_tokens",
                 "temperature", "top_p", "seed", "ignore_eos", "stream", "stream_options",
                 "logprobs", "top_logprobs",
                 *HONOURED, *REFUSED_FIELDS, *NO_OP_FIELDS})
"""Every request field either API knows, so that mutations hit the validators behind them."""

EDGE_VALUES = [
    None, True, False, 0, -1, 1, 2, 0.5, 2.5, 2**63, -(2**63), float("nan"), float("inf"),
    "", " ", "\n\t ", "hi", "tiny", "user", "text", "none", "auto", [], {}, [""], [" "],
    ["a", "b"], {"type": "text"}, [{"role": "user", "content": " "}], [{"role": "user"}],
]
"""Values at the edges of what the validators accept (empty, blank, zero, huge, NaN, ...)."""

EDGES = st.sampled_from(EDGE_VALUES)

JSON_VALUES = st.one_of(EDGES, EDGES, st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
))

ENDPOINTS = {  # path -> a valid body to mutate
    "/v1/functions/tiny/invoke": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
}


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """An endpoint and a body: its valid body with fields dropped, replaced by arbitrary JSON
    (NaN and infinities included, which Python's JSON parser reads), or added, or now and then
    a body that is not an object or not JSON at all. ``max_tokens`` stays small unless
    mutated, so that requests that pass validation generate a few tokens only."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    kind = draw(st.sampled_from(["mutate"] * 8 + ["not-object", "not-json"]))
    if kind == "not-json":
        return path, draw(st.binary(max_size=32))
    if kind == "not-object":
        return path, json.dumps(draw(JSON_VALUES)).encode()
    body = dict(ENDPOINTS[path])
    fields = st.sampled_from(sorted(body)) | st.sampled_from(FIELDS) | st.text(max_size=6)
    for field in draw(st.lists(fields, min_size=1, max_size=4)):
        if field in body and draw(st.booleans()):
            del body[field]
        else:
            body[field] = draw(JSON_VALUES)
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 64)
    return path, json.dumps(body).encode()


def check_answer(path: str, body: bytes, status: int, data: bytes) -> None:
    """A success, or a 4xx in the OpenAI error envelope; a stream that ended well."""
    assert status < 500, (path, body, data)
    if status >= 400:
        err = json.loads(data)["error"]
        assert err["message"] and err["type"] and err["code"], data
    elif data.startswith(b"{"):
        assert "error" not in json.loads(data), data
    else:  # a stream, which ended well: no error event, and its last event
        events = list(parse_events(data.decode().splitlines()))
        assert not any(e == "error" or isinstance(d, dict) and "error" in d
                       for e, d in events), events
        assert events[-1][0] == "done" or events[-1][1] == "[DONE]", events


DECLARED = {
    "/v1/functions/tiny/invoke": ["prompt", "messages", "raw", "max_tokens", "temperature",
                                  "top_p", "seed", "ignore_eos", "stream"],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens",
                             "temperature", "top_p", "seed", "ignore_eos", "stream",
                             "stream_options"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "seed",
                        "ignore_eos", "stream", "stream_options"],
}


def test_every_field_at_every_edge_value_gets_a_success_or_a_4xx(cluster: Cluster) -> None:
    """Each field each invocation endpoint declares, dropped or set to each edge value in turn
    (about 900 requests on one connection): a whitespace prompt on an OpenAI endpoint was a 500
    that reset its connection."""
    with OneConnection(cluster.gateway) as conn:
        for path, fields in DECLARED.items():
            for field in fields:
                variants = [{k: v for k, v in ENDPOINTS[path].items() if k != field}]
                variants += [{**ENDPOINTS[path], field: value} for value in EDGE_VALUES
                             if not (field == "max_tokens" and isinstance(value, int)
                                     and value > 64)]  # valid, but long to generate
                for body in variants:
                    raw = json.dumps(body).encode()
                    check_answer(path, raw, *conn.request("POST", path, raw))


def test_fuzzed_requests_never_get_a_500_and_never_break_the_connection(cluster: Cluster) -> None:
    """A bounded fuzz of the gateway's three invocation endpoints against the running runtime
    (several fields mutated at once, unknown fields, bodies that are not objects or not JSON):
    every answer is a success or a 4xx in the OpenAI error envelope (:func:`check_answer`), and
    every one of them comes back on the same kept-alive connection."""
    with OneConnection(cluster.gateway) as conn:

        @settings(max_examples=300, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(mutated_requests())
        def check(request: tuple[str, bytes]) -> None:
            path, body = request
            check_answer(path, body, *conn.request("POST", path, body))

        check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a cluster without a GPU invoker")
def test_the_manifests_device_decides_where_instances_run(cluster: Cluster) -> None:
    """``spec.resources.device``: a ``cuda`` function on a cluster of CPU invokers is a 503
    naming the device (it is never started on a CPU); a ``cpu`` one runs on a CPU invoker."""
    cluster.deploy(manifest("tiny-gpu", MODEL, resources={"device": "cuda", "memory": "256Mi"}))
    cluster.deploy(manifest("tiny-cpu", MODEL, resources={"device": "cpu", "memory": "256Mi"}))
    with cluster.client() as c:
        r = c.post("/v1/functions/tiny-gpu/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert "asks for device 'cuda'" in r.json()["error"]["message"] and r.headers["retry-after"]
        assert c.get("/v1/functions/tiny-gpu").json()["instances"] == []
        r = c.post("/v1/functions/tiny-cpu/invoke", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        iid = r.json()["instance_id"]
        invoker_url = next(i["invoker_url"] for i in c.get("/v1/instances").json()["instances"]
                           if i["id"] == iid)
        loaded = httpx.get(f"{invoker_url}/v1/instances").json()["instances"]
        assert next(i["device"] for i in loaded if i["instance_id"] == iid) == "cpu"
        for name in ("tiny-gpu", "tiny-cpu"):
            assert c.delete(f"/v1/functions/{name}").status_code == 200


def test_concurrent_invocations_queue_for_the_single_instance(cluster: Cluster) -> None:
    def call(i: int) -> dict[str, Any]:
        with cluster.client() as c:
            r = c.post("/v1/functions/tiny/invoke", json={"prompt": f"question {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(call, range(4)))
    assert {r["instance_id"] for r in results} and all(r["usage"]["completion_tokens"] > 0 for r in results)
    with cluster.client() as c:
        insts = [i for i in c.get("/v1/instances").json()["instances"] if i["function"] == "tiny"]
    assert len(insts) == 1  # maxInstances: 1


def test_concurrent_calls_are_batched_in_one_instance_and_its_engine_is_on_metrics(
        cluster: Cluster, reference: Any) -> None:
    """targetConcurrency 4 under fcfs: four streams run together in one instance's iterations
    (fewer iterations than tokens), each with transformers' greedy tokens; the invoker's
    /metrics names the instance; the instance states its KV budget."""
    cluster.deploy(manifest("batched", MODEL, scaling={"maxInstances": 1, "targetConcurrency": 4,
                                                       "keepAlive": "600s"},
                            generation={"maxTokens": 40, "temperature": 0.0},
                            scheduling={"policy": "fcfs", "maxBatch": 4}))

    def call(_: int) -> dict[str, Any]:
        with cluster.client() as c:
            r = c.post("/v1/functions/batched/invoke", json={"prompt": PROMPT, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(call, range(4)))
    want = reference.tokenizer.decode(reference(messages=user(PROMPT), max_new_tokens=40),
                                      skip_special_tokens=True)
    assert [r["text"] for r in results] == [want] * 4
    with cluster.client() as c:
        [inst] = [i for i in c.get("/v1/instances").json()["instances"] if i["function"] == "batched"]
        assert inst["kv_budget_tokens"] > 0
        text = httpx.get(f"{inst['invoker_url']}/metrics", timeout=10).text
    labels = f'function="batched",instance="{inst["id"]}"'  # (sorted by name)
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if labels in line}
    assert samples["sllm_generation_tokens_total"] >= 4 * 40
    assert samples["sllm_iterations_total"] < 4 * 40  # the streams shared iterations
    assert samples["sllm_num_requests_running"] == 0 and 0 <= samples["sllm_kv_cache_usage_perc"]


def test_n_choices_share_one_prefill_and_each_draws_as_its_own_seed_would(cluster: Cluster) -> None:
    """n=3 on a function with room for three: three choices in OpenAI's shape (the prompt
    counted once), choice i drawn as a call seeded seed + i; the streamed choices carry the
    same texts, each with one finish; the invoker's engine took the prompt of two of them from
    the first's cache. On a function with one slot, n=2 still completes (one after the
    other)."""
    cluster.deploy(manifest("choices", MODEL, scaling={"maxInstances": 1, "targetConcurrency": 3,
                                                       "keepAlive": "600s"},
                            scheduling={"policy": "fcfs", "maxBatch": 4}))
    body = {"model": "choices", "messages": user(PROMPT), "max_tokens": 12, "ignore_eos": True,
            "temperature": 1.0, "seed": 5}
    with cluster.client() as c:
        r = c.post("/v1/chat/completions", json={**body, "n": 3})
        assert r.status_code == 200, r.text
        answer = r.json()
        alone = [c.post("/v1/chat/completions", json={**body, "seed": 5 + i}).json()
                 for i in range(3)]
        with c.stream("POST", "/v1/chat/completions", json={**body, "n": 3, "stream": True}) as s:
            chunks = [json.loads(line[len("data: "):]) for line in s.iter_lines()
                      if line.startswith("data: {")]
        r2 = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3,
                                             "n": 2})
        [inst] = [i for i in c.get("/v1/instances").json()["instances"] if i["function"] == "choices"]
        metrics = httpx.get(f"{inst['invoker_url']}/metrics", timeout=10).text
    texts = [ch["message"]["content"] for ch in answer["choices"]]
    assert [ch["index"] for ch in answer["choices"]] == [0, 1, 2]
    assert texts == [a["choices"][0]["message"]["content"] for a in alone]
    assert len(set(texts)) > 1
    assert answer["usage"]["completion_tokens"] == 36
    assert answer["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert len(answer["sllm"]["activation_ids"]) == 3
    streamed = ["".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks
                        if ch["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == texts
    assert sorted(ch["choices"][0]["index"] for ch in chunks
                  if ch["choices"][0]["finish_reason"]) == [0, 1, 2]
    hits = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("sllm_prefix_cache_hits_total") and inst["id"] in line]
    assert hits and hits[0] >= 2 * (answer["usage"]["prompt_tokens"] - 1)
    assert r2.status_code == 200 and [ch["index"] for ch in r2.json()["choices"]] == [0, 1], r2.text


def test_a_bad_scheduling_section_is_refused_naming_the_field(cluster: Cluster) -> None:
    body = manifest("bad-sched", MODEL, scheduling={"policy": "lifo"})
    with cluster.client() as c:
        r = c.put("/v1/functions/bad-sched", json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == "spec.scheduling.policy", r.text


def _instances_in_etcd(cluster: Cluster, function: str) -> list[InstanceRecord]:
    async def read() -> list[InstanceRecord]:
        async with Etcd(cluster.state.etcd_endpoint) as etcd:
            return [r for r in await etcd.list(keys.Kind.INSTANCE, InstanceRecord) if r.function == function]
    return asyncio.run(read())


def test_scale_to_zero_after_keep_alive_then_cold_start_again(cluster: Cluster) -> None:
    cluster.deploy(manifest("tiny-ephemeral", MODEL,
                            scaling={"minInstances": 0, "maxInstances": 1, "keepAlive": "1s"}))
    with cluster.client() as c:
        first = c.post("/v1/functions/tiny-ephemeral/invoke", json={"prompt": "hi", "max_tokens": 2}).json()
    assert first["timings"]["cold_start"] is True
    # the controller's background flusher writes the record's later states (loading, active,
    # idle) shortly after each change; a read between two flushes may still see "active"
    wait_for(lambda: [r.state.value for r in _instances_in_etcd(cluster, "tiny-ephemeral")]
             in (["idle"], ["warm"]), timeout=5)
    deadline = time.monotonic() + 20
    while _instances_in_etcd(cluster, "tiny-ephemeral") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _instances_in_etcd(cluster, "tiny-ephemeral") == []
    with cluster.client() as c:
        assert c.get("/v1/functions/tiny-ephemeral").json()["instances"] == []
        again = c.post("/v1/functions/tiny-ephemeral/invoke", json={"prompt": "hi", "max_tokens": 2}).json()
    assert again["timings"]["cold_start"] is True
    assert again["timings"]["tier"] == "dram"  # scaled to zero, but still cached in the pool
    assert again["text"] == first["text"]


def test_function_lifecycle_through_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "fn.yaml"
    path.write_text(
        "apiVersion: sllm.dev/v1\nkind: Function\nmetadata: {name: tiny-cli}\n"
        f"spec: {{model: {MODEL}, generation: {{maxTokens: 4}}}}\n"
    )
    env = {**os.environ, "SLLM_GATEWAY": cluster.gateway, "SLLM_HOME": str(cluster.home)}

    def sllm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], check=False, env=env, capture_output=True,
                              text=True, timeout=120)

    assert sllm("fn", "create", "-f", str(path)).returncode == 0
    dup = sllm("fn", "create", "-f", str(path))
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert "tiny-cli" in sllm("fn", "list").stdout
    out = sllm("fn", "invoke", "tiny-cli", "--prompt", "hi")
    assert out.returncode == 0, out.stderr
    assert "cold start" in out.stderr and "TTFT" in out.stderr
    js = sllm("fn", "invoke", "tiny-cli", "--prompt", "hi", "--no-stream", "--json")
    assert json.loads(js.stdout)["usage"]["completion_tokens"] == 4
    assert json.loads(sllm("fn", "get", "tiny-cli", "--json").stdout)["manifest"]["spec"]["model"] == MODEL
    shown = sllm("fn", "get", "tiny-cli").stdout  # the placement decision, with each candidate
    assert "placement (ours): invoker-0" in shown and "queue s" in shown, shown
    path.write_text(path.read_text().replace("maxTokens: 4", "maxTokens: 3"))
    assert sllm("fn", "update", "-f", str(path)).returncode == 0
    js = sllm("fn", "invoke", "tiny-cli", "--prompt", "hi", "--no-stream", "--json")
    assert json.loads(js.stdout)["usage"]["completion_tokens"] == 3
    assert "invoker-0" in sllm("status").stdout
    assert "tiny-llama" in sllm("model", "list").stdout
    assert sllm("fn", "delete", "tiny-cli").returncode == 0
    gone = sllm("fn", "get", "tiny-cli")
    assert gone.returncode == 1 and "no function named" in gone.stderr
    bad = sllm("fn", "invoke", "tiny", "--prompt", "")
    assert bad.returncode == 1 and "empty" in bad.stderr
