"""The model store: naming, listing, committing staged checkpoints, removing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from sllm.errors import CheckpointError, Conflict, InvalidRequest, ModelNotFound
from store.checkpoint import write_tensors
from store.model_store import ModelInfo, ModelStore, sanitize_name, validate_name


def _put(store: ModelStore, name: str, n: int = 10, *, replace: bool = False) -> ModelInfo:
    staging = store.staging_dir(name)
    write_tensors(
        staging,
        {"a": torch.ones(n, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.int8)},
        meta={"source": f"/src/{name}", "name": name},
    )
    try:
        return store.commit(name, staging, replace=replace)
    except BaseException:
        store.discard(staging)
        raise


def test_a_new_store_creates_its_root_and_lists_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "deep" / "models")

    assert (tmp_path / "deep" / "models").is_dir()
    assert store.list() == []


def test_committed_model_is_listed_with_its_facts(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    before = time.time()

    info = _put(store, "m1", n=5000)

    assert store.exists("m1")
    assert store.path("m1") == tmp_path / "m1"
    assert info == store.get("m1")
    assert info.name == "m1" and info.path == tmp_path / "m1"
    assert info.nbytes == 16384 and info.num_tensors == 2
    assert info.dtype == "bfloat16" and info.source == "/src/m1"
    assert before <= info.created <= time.time()


def test_list_is_sorted_by_name(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ["zeta", "alpha", "mid-1.0_x"]:
        _put(store, name)

    assert [m.name for m in store.list()] == ["alpha", "mid-1.0_x", "zeta"]


def test_staging_and_incomplete_folders_are_not_models(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _put(store, "done")
    store.staging_dir("pending")  # an import still running (or one that crashed)
    (tmp_path / "half").mkdir()  # a folder without an index
    (tmp_path / "half" / "data-00000.bin").write_bytes(b"x")

    assert [m.name for m in store.list()] == ["done"]
    assert not store.exists("half") and not store.exists("pending")
    with pytest.raises(ModelNotFound):
        store.get("half")


def test_remove_deletes_the_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _put(store, "gone")

    store.remove("gone")

    assert not store.exists("gone")
    assert store.list() == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("op", ["get", "path", "remove"])
def test_unknown_model_is_model_not_found(tmp_path: Path, op: str) -> None:
    store = ModelStore(tmp_path)

    with pytest.raises(ModelNotFound, match="nosuch"):
        getattr(store, op)("nosuch")


@pytest.mark.parametrize(
    "name", ["", "Upper", "has space", ".hidden", "-dash", "a/b", "..", "x" * 64, "ü", "a\n"]
)
def test_invalid_names_are_invalid_requests(tmp_path: Path, name: str) -> None:
    store = ModelStore(tmp_path)

    with pytest.raises(InvalidRequest):
        validate_name(name)
    with pytest.raises(InvalidRequest):
        store.exists(name)
    with pytest.raises(InvalidRequest):
        store.staging_dir(name)


def test_longest_valid_name_is_63_characters() -> None:
    assert validate_name("a" * 63) == "a" * 63


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct.q4_1"),
        ("My Model (v2)", "my-model-v2-"),
        ("__init", "init"),
        ("x" * 80, "x" * 63),
    ],
)
def test_sanitize_name_makes_valid_names(raw: str, name: str) -> None:
    assert sanitize_name(raw) == name


def test_sanitize_name_refuses_nothing_usable() -> None:
    with pytest.raises(InvalidRequest):
        sanitize_name("...")


def test_commit_over_an_existing_name_is_a_conflict_unless_replacing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _put(store, "m", n=10)

    with pytest.raises(Conflict, match="'m'"):
        _put(store, "m", n=5000)
    assert store.get("m").nbytes == 8192

    info = _put(store, "m", n=5000, replace=True)

    assert info.nbytes == 16384
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_commit_refuses_a_staging_folder_without_an_index(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    staging = store.staging_dir("empty")

    with pytest.raises(CheckpointError):
        store.commit("empty", staging)
    assert not store.exists("empty")


def test_commit_refuses_a_folder_that_is_not_staging(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    with pytest.raises(InvalidRequest):
        store.commit("x", elsewhere)


def test_discard_removes_a_staging_folder(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    staging = store.staging_dir("x")

    store.discard(staging)

    assert not staging.exists()


def test_a_model_with_a_corrupt_index_is_skipped_by_list(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _put(store, "good")
    _put(store, "bad")
    (tmp_path / "bad" / "index.json").write_text("{")

    assert [m.name for m in store.list()] == ["good"]
    with pytest.raises(CheckpointError):
        store.get("bad")
