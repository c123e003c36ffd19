"""The checkpoint format: writing, loading, sharing, alignment, corruption; the native reader."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from native_loader import ReadError, read_files
from sllm.errors import CheckpointError
from store.checkpoint import (
    ALIGNMENT,
    DTYPES,
    file_offsets,
    load_checkpoint,
    read_index,
    write_checkpoint,
)

SHAPES = [(), (0,), (1,), (7, 13), (3, 0, 5), (2, 3, 5)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A contiguous tensor of random bytes (any dtype, including ones torch cannot draw)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, element by element."""
    return t.reshape(-1).view(torch.uint8)


def _values(t: torch.Tensor) -> torch.Tensor:
    """The bytes of any tensor's elements in logical order."""
    return _bytes(t.contiguous())


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_dtype_and_odd_shape_round_trips_bit_exact(tmp_path: Path, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    tensors = {f"t{i}": _random(shape, dtype, seed=i) for i, shape in enumerate(SHAPES)}

    write_checkpoint(tmp_path / "ck", tensors)
    loaded = load_checkpoint(tmp_path / "ck").tensors

    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        got = loaded[name]
        assert got.dtype == dtype
        assert got.shape == t.shape and got.stride() == t.stride()
        assert torch.equal(_bytes(got), _bytes(t)), name


def test_common_dtypes_are_supported() -> None:
    wanted = {"float32", "bfloat16", "float16", "float64", "float8_e4m3fn"}
    wanted |= {"int8", "uint8", "int32", "int64", "bool"}
    assert wanted <= set(DTYPES)


def test_non_contiguous_tensors_keep_shape_stride_and_values(tmp_path: Path) -> None:
    base = torch.arange(7 * 13, dtype=torch.float32).reshape(7, 13)
    tensors = {
        "transposed": torch.randn(5, 3).t(),
        "stepped": torch.arange(40, dtype=torch.int64)[3::4],
        "strided_2d": torch.randn(6, 10, dtype=torch.bfloat16)[1::2, 2::3],
        "expanded": torch.tensor([1.0, 2.0]).reshape(2, 1).expand(2, 5),
        "prime": base.t()[2:5],
    }

    write_checkpoint(tmp_path / "ck", tensors)
    loaded = load_checkpoint(tmp_path / "ck").tensors

    for name, t in tensors.items():
        got = loaded[name]
        assert got.shape == t.shape and got.stride() == t.stride(), name
        assert torch.equal(_values(got), _values(t)), name


def test_non_shared_slice_stores_only_its_span(tmp_path: Path) -> None:
    big = torch.zeros(1 << 20, dtype=torch.uint8)  # 1 MiB storage
    index = write_checkpoint(tmp_path / "ck", {"tail": big[-10:]})

    assert index.total_bytes == ALIGNMENT


def test_tied_and_view_tensors_are_written_once_and_share_memory_after_load(
    tmp_path: Path,
) -> None:
    embed = torch.randn(64, 32)
    tensors = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed,
        "transposed": embed.t(),
        "rows": embed[8:16],
        "every_other_column": embed[:, ::2],
    }

    index = write_checkpoint(tmp_path / "ck", tensors)
    loaded = load_checkpoint(tmp_path / "ck").tensors

    assert index.total_bytes == 64 * 32 * 4  # stored once (already a multiple of 4096)
    head, emb = loaded["lm_head.weight"], loaded["model.embed_tokens.weight"]
    assert head.data_ptr() == emb.data_ptr()
    assert loaded["transposed"].data_ptr() == emb.data_ptr()
    for name, t in tensors.items():
        assert loaded[name].stride() == t.stride()
        assert torch.equal(loaded[name], t), name
    emb[9, 4] = 1234.5
    assert head[9, 4] == 1234.5
    assert loaded["transposed"][4, 9] == 1234.5
    assert loaded["rows"][1, 4] == 1234.5
    assert loaded["every_other_column"][9, 2] == 1234.5


def test_views_of_one_storage_in_different_dtypes_share_memory(tmp_path: Path) -> None:
    raw = torch.arange(64, dtype=torch.uint8)
    tensors = {"bytes": raw[3:9], "words": raw[8:40].view(torch.int32)}

    write_checkpoint(tmp_path / "ck", tensors)
    loaded = load_checkpoint(tmp_path / "ck").tensors

    assert torch.equal(loaded["words"], tensors["words"])
    assert torch.equal(loaded["bytes"], tensors["bytes"])
    assert loaded["words"].data_ptr() == loaded["bytes"].data_ptr() + 5


def test_every_tensor_is_a_view_of_the_one_buffer(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ck", {"a": torch.randn(3), "b": torch.randn(1000, 7)})
    ck = load_checkpoint(tmp_path / "ck")

    assert ck.buffer.dtype == torch.uint8 and ck.buffer.dim() == 1
    storage = ck.buffer.untyped_storage().data_ptr()
    for t in ck.tensors.values():
        assert t.untyped_storage().data_ptr() == storage
    assert ck.nbytes == ck.index.total_bytes == ck.buffer.numel()
    assert ck.seconds >= 0


def test_every_storage_and_file_is_aligned_to_4096_in_files_and_in_memory(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.randn(i * 37 + 1) for i in range(12)}
    index = write_checkpoint(tmp_path / "ck", tensors, file_bytes=3 * ALIGNMENT)
    ck = load_checkpoint(tmp_path / "ck")

    assert len(index.files) > 1
    for f in index.files:
        assert f.size % ALIGNMENT == 0
        assert (tmp_path / "ck" / f.name).stat().st_size == f.size
    for e in index.tensors.values():
        assert e.offset % ALIGNMENT == 0
    assert all(off % ALIGNMENT == 0 for off in file_offsets(index))
    for t in ck.tensors.values():
        assert t.data_ptr() % ALIGNMENT == 0


def test_small_file_target_splits_data_across_files_and_round_trips(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.randn(1500) for i in range(5)}  # 6000 B each -> 8192 B spans
    tensors["big"] = torch.randn(10_000)  # larger than the target: a file of its own
    index = write_checkpoint(tmp_path / "ck", tensors, file_bytes=16384)
    loaded = load_checkpoint(tmp_path / "ck").tensors

    assert [f.name for f in index.files] == [f"data-0000{i}.bin" for i in range(4)]
    assert index.tensors["big"].file == 3 and index.tensors["big"].offset == 0
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(
        ["index.json", "config.json"] + [f.name for f in index.files]
    )
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


def test_one_checksum_per_chunk(tmp_path: Path) -> None:
    index = write_checkpoint(tmp_path / "ck", {"w": torch.randn(5000)}, chunk_bytes=4096)

    (f,) = index.files
    assert f.size == 20480 and f.chunk_bytes == 4096
    assert len(f.checksums) == 5 and len(set(f.checksums)) == 5


def test_config_is_saved_without_quantization_config_and_meta_is_recorded(tmp_path: Path) -> None:
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}
    index = write_checkpoint(
        tmp_path / "ck", {"w": torch.ones(2, dtype=torch.float16)}, config=config,
        meta={"source": "here"},
    )
    ck = load_checkpoint(tmp_path / "ck")

    assert ck.config == {"model_type": "llama"}
    assert index.meta["source"] == "here" and index.meta["dtype"] == "float16"
    assert read_index(tmp_path / "ck") == index


def test_write_refuses_an_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "ck", {"w": torch.ones(1)})


def test_failed_write_leaves_neither_destination_nor_temp_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path / "ck", {"w": torch.ones(4)}, meta={"x": object()})

    assert list(tmp_path.iterdir()) == []


def test_unstorable_tensors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta"):
        write_checkpoint(tmp_path / "a", {"w": torch.empty(3, device="meta")})
    with pytest.raises(ValueError, match="strided"):
        write_checkpoint(tmp_path / "b", {"w": torch.eye(3).to_sparse()})


# --- corruption ---------------------------------------------------------------------------------


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    """A checkpoint of two data files with 4 KiB checksum chunks."""
    tensors = {f"w{i}": torch.randn(3000) for i in range(4)}  # 12000 B -> 12288 B spans
    write_checkpoint(tmp_path / "ck", tensors, file_bytes=25000, chunk_bytes=4096)
    return tmp_path / "ck"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_flipped_byte_is_a_checkpoint_error_naming_file_and_chunk(ck: Path) -> None:
    _flip(ck / "data-00001.bin", 2 * 4096 + 17)

    with pytest.raises(CheckpointError, match=r"data-00001\.bin.*chunk 2"):
        load_checkpoint(ck)


def test_verify_false_skips_checksums(ck: Path) -> None:
    _flip(ck / "data-00000.bin", 0)
    loaded = load_checkpoint(ck, verify=False).tensors

    assert loaded["w0"].shape == (3000,)


def test_a_truncated_data_file_is_a_checkpoint_error_even_without_verify(ck: Path) -> None:
    path = ck / "data-00001.bin"
    os.truncate(path, path.stat().st_size - 1)

    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"data-00001\.bin.*truncated"):
            load_checkpoint(ck, verify=verify)


def test_a_data_file_longer_than_the_index_says_is_a_checkpoint_error(ck: Path) -> None:
    with open(ck / "data-00000.bin", "ab") as f:
        f.write(b"\0")

    with pytest.raises(CheckpointError, match=r"data-00000\.bin.*longer"):
        load_checkpoint(ck)


def test_a_missing_data_file_is_a_checkpoint_error(ck: Path) -> None:
    (ck / "data-00001.bin").unlink()

    with pytest.raises(CheckpointError, match=r"data-00001\.bin.*missing"):
        load_checkpoint(ck)


def test_a_missing_index_is_a_checkpoint_error(ck: Path) -> None:
    (ck / "index.json").unlink()

    with pytest.raises(CheckpointError, match=r"index\.json.*missing"):
        load_checkpoint(ck)


@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"format_version": 1}'])
def test_garbage_index_is_a_checkpoint_error(ck: Path, text: str) -> None:
    (ck / "index.json").write_text(text)

    with pytest.raises(CheckpointError, match=r"index\.json"):
        load_checkpoint(ck)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("offset", 24576, "outside"),
        ("file", 7, "names file 7"),
        ("nbytes", 8, "span"),
        ("dtype", "float7", "unknown dtype"),
        ("surprise", 1, "surprise"),
    ],
)
def test_an_inconsistent_index_entry_is_a_checkpoint_error(
    ck: Path, field: str, value: object, reason: str
) -> None:
    raw = json.loads((ck / "index.json").read_text())
    raw["tensors"]["w1"][field] = value
    (ck / "index.json").write_text(json.dumps(raw))

    with pytest.raises(CheckpointError, match=reason):
        read_index(ck)


def test_an_unknown_format_version_is_a_checkpoint_error(ck: Path) -> None:
    raw = json.loads((ck / "index.json").read_text())
    raw["format_version"] = 2
    (ck / "index.json").write_text(json.dumps(raw))

    with pytest.raises(CheckpointError, match="format_version"):
        read_index(ck)


# --- native_loader.read_files -------------------------------------------------------------------


def _files(tmp_path: Path, sizes: list[int]) -> list[tuple[str, bytes]]:
    out = []
    for i, n in enumerate(sizes):
        data = os.urandom(n)
        path = tmp_path / f"f{i}"
        path.write_bytes(data)
        out.append((str(path), data))
    return out


def test_read_files_places_each_file_at_its_offset(tmp_path: Path) -> None:
    (a, da), (b, _db), (c, dc) = _files(tmp_path, [5000, 0, 12345])
    dest = bytearray(20000)

    n = read_files([(a, 100, 5000), (b, 6000, 0), (c, 7000, 12345)], dest, chunk_bytes=1000)

    assert n == 17345
    assert dest[100:5100] == da and dest[7000:19345] == dc
    assert dest[:100] == bytes(100) and dest[5100:7000] == bytes(1900)


def test_read_files_fills_a_numpy_view_of_a_torch_tensor(tmp_path: Path) -> None:
    ((a, da),) = _files(tmp_path, [4096])
    dest = torch.zeros(8192, dtype=torch.uint8)

    read_files([(a, 4096, 4096)], dest.numpy())

    assert dest[4096:].numpy().tobytes() == da
    assert np.count_nonzero(dest[:4096].numpy()) == 0


def test_read_files_short_file_raises_read_error_naming_file_and_offset(tmp_path: Path) -> None:
    ((a, _),) = _files(tmp_path, [3000])

    with pytest.raises(ReadError, match=r"f0.*offset 3000") as info:
        read_files([(a, 0, 4000)], bytearray(4000), chunk_bytes=1024)
    assert info.value.path == a and info.value.offset == 3000


def test_read_files_longer_file_raises_read_error(tmp_path: Path) -> None:
    ((a, _),) = _files(tmp_path, [3000])

    with pytest.raises(ReadError, match="longer"):
        read_files([(a, 0, 2000)], bytearray(4000))


def test_read_files_missing_file_raises_read_error_with_enoent(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="nope") as info:
        read_files([(str(tmp_path / "nope"), 0, 10)], bytearray(10))
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, OSError)


def test_read_files_refuses_a_range_outside_dest(tmp_path: Path) -> None:
    ((a, _),) = _files(tmp_path, [100])

    with pytest.raises(ValueError, match="outside"):
        read_files([(a, 50, 100)], bytearray(120))
    with pytest.raises(ValueError, match="read-only"):
        read_files([(a, 0, 100)], bytes(100))
