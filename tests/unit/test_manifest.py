"""The manifest schema: valid manifests parse; every kind of bad manifest names its field."""

from __future__ import annotations

import pytest

from sllm.errors import ManifestError
from sllm.manifest import parse_duration, parse_manifest, parse_quantity

GOOD = """
apiVersion: sllm.dev/v1
kind: Function
metadata: {name: smollm2-chat}
spec:
  model: smollm2-135m-instruct
  resources: {device: auto, memory: 1Gi}
  scaling: {minInstances: 0, maxInstances: 1, targetConcurrency: 1, keepAlive: 60s}
  generation: {maxTokens: 128, temperature: 0.0}
"""


def test_the_demo_manifest_parses_with_units_converted() -> None:
    m = parse_manifest(GOOD)
    assert m.name == "smollm2-chat"
    assert m.spec.resources.memory == 1 << 30
    assert m.spec.scaling.keepAlive == 60.0
    assert m.spec.generation.maxTokens == 128


def test_the_shipped_manifest_file_parses() -> None:
    from pathlib import Path

    m = parse_manifest((Path(__file__).parents[2] / "functions" / "smollm2-chat.yaml").read_text())
    assert m.spec.model == "smollm2-135m-instruct"


def test_defaults_fill_optional_sections() -> None:
    m = parse_manifest("apiVersion: sllm.dev/v1\nkind: Function\nmetadata: {name: f}\nspec: {model: m}\n")
    assert m.spec.scaling.minInstances == 0 and m.spec.scaling.maxInstances == 1
    assert m.spec.resources.device == "auto"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("minInstances: 0", "minInstances: -1"), "spec.scaling.minInstances"),
        (("maxInstances: 1", "maxInstances: 0"), "spec.scaling.maxInstances"),
        (("maxTokens: 128", "maxTokens: lots"), "spec.generation.maxTokens"),
        (("keepAlive: 60s", "keepAlive: forever"), "spec.scaling.keepAlive"),
        (("memory: 1Gi", "memory: 1 gallon"), "spec.resources.memory"),
        (("device: auto", "device: tpu"), "spec.resources.device"),
        (("name: smollm2-chat", "name: Bad_Name"), "metadata.name"),
        (("apiVersion: sllm.dev/v1", "apiVersion: v2"), "apiVersion"),
        (("temperature: 0.0", "temperature: 0.0, topK: 5"), "spec.generation.topK"),
        (("model: smollm2-135m-instruct", "modle: x"), "spec.model"),
    ],
)
def test_invalid_field_is_refused_naming_the_field(edit: tuple[str, str], field: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_manifest(GOOD.replace(*edit))
    assert field in e.value.message
    assert e.value.status == 422


def test_unknown_field_says_unknown() -> None:
    with pytest.raises(ManifestError, match=r"spec\.replicas: unknown field"):
        parse_manifest(GOOD + "  replicas: 3\n")


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ManifestError, match="exceeds maxInstances"):
        parse_manifest(GOOD.replace("minInstances: 0", "minInstances: 2"))


def test_malformed_yaml_gives_line_and_column() -> None:
    with pytest.raises(ManifestError, match=r"malformed YAML at line \d+, column \d+"):
        parse_manifest("apiVersion: sllm.dev/v1\nkind: [Function\n")


@pytest.mark.parametrize("text", ["", "just a string", "- a\n- list\n"])
def test_non_mapping_documents_are_refused(text: str) -> None:
    with pytest.raises(ManifestError, match="mapping"):
        parse_manifest(text)


@pytest.mark.parametrize(("text", "seconds"), [("60s", 60), ("500ms", 0.5), ("5m", 300), ("1h", 3600), (7, 7)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "nbytes"), [("1Gi", 2**30), ("512Mi", 2**29), ("2G", 2 * 10**9), (1024, 1024)])
def test_quantities(text: object, nbytes: int) -> None:
    assert parse_quantity(text) == nbytes
