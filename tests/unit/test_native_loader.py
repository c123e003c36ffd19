"""The I/O engine: every behaviour runs against every engine (the C++ NativeReader with each of
its backends, io_uring and threads, and its pure-Python twin PyReader), plus what only the C++
engine has (O_DIRECT and its counters, the backend choice)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import native_loader
from native_loader import NativeReader, PyReader, Reader, ReadError, read_files

MakeReader = Callable[..., Reader]
PAGE = 4096


BACKENDS = ["io_uring", "threads"]


def _skip_unless_backend_works(backend: str) -> None:
    if NativeReader is None:
        pytest.skip("the C++ engine is not built (pip install -e .)")
    if backend == "io_uring":
        try:
            NativeReader(1, True, backend="io_uring").close()
        except RuntimeError as e:  # the kernel (or a seccomp filter) refuses io_uring
            pytest.skip(str(e))


@pytest.fixture(params=["py", "native-io_uring", "native-threads"])
def make_reader(request: pytest.FixtureRequest) -> Iterator[MakeReader]:
    """A factory of readers of one engine; every reader it made is closed afterwards."""
    backend = request.param.removeprefix("native-")
    if request.param != "py":
        _skip_unless_backend_works(backend)
    made: list[Reader] = []

    def make(threads: int = 4, direct: bool = True) -> Reader:
        if request.param == "py":
            reader: Reader = PyReader(threads, direct)
        else:
            reader = NativeReader(threads, direct, backend=backend)
        made.append(reader)
        return reader

    yield make
    for reader in made:
        reader.close()


def _buffer(n: int) -> tuple[mmap.mmap, int]:
    """Page-aligned anonymous memory of n bytes and its address."""
    m = mmap.mmap(-1, max(n, 1))
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def _file(folder: Path, name: str, n: int) -> tuple[str, bytes]:
    data = os.urandom(n)
    path = folder / name
    path.write_bytes(data)
    return str(path), data


def _direct_io_works(folder: Path) -> bool:
    """Whether an aligned O_DIRECT read succeeds on folder's filesystem."""
    path = folder / "probe"
    path.write_bytes(bytes(PAGE))
    m, _ = _buffer(PAGE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [m], 0) == PAGE
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        path.unlink()


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a filesystem that allows O_DIRECT (tmp_path may be on tmpfs)."""
    for parent in (tmp_path, Path("/var/tmp"), Path(__file__).parent):
        folder = Path(tempfile.mkdtemp(prefix="sllm-direct-", dir=parent))
        if _direct_io_works(folder):
            yield folder
            shutil.rmtree(folder)
            return
        shutil.rmtree(folder)
    pytest.skip("no filesystem here allows O_DIRECT")


def test_the_native_engine_is_built_by_the_project_setup() -> None:
    assert native_loader.NATIVE
    assert isinstance(native_loader.default_reader(), NativeReader)


def test_many_small_requests_in_flight_at_once_all_complete(make_reader: MakeReader,
                                                            tmp_path: Path) -> None:
    """More requests than the io_uring backend keeps in flight (64), some unaligned."""
    path, data = _file(tmp_path, "data", 400 * PAGE + 123)
    m, base = _buffer(len(data))
    reader = make_reader()
    # 400 one-page requests, then the 123-byte tail, then 50 odd ones over the same bytes
    requests = [(at, min(PAGE, len(data) - at)) for at in range(0, len(data), PAGE)]
    requests += [(k * 4099, 777) for k in range(50)]

    tickets = [reader.submit(path, at, n, base + at) for at, n in requests]

    assert [reader.wait(t) for t in tickets] == [n for _, n in requests]
    assert m[: len(data)] == data


def test_a_request_larger_than_one_ring_piece_is_read_whole(make_reader: MakeReader,
                                                            tmp_path: Path) -> None:
    """20 MiB + 5 bytes: three 8 MiB io_uring pieces and a buffered tail in one request."""
    path, data = _file(tmp_path, "big", (20 << 20) + 5)
    m, base = _buffer(len(data))
    reader = make_reader()

    assert reader.wait(reader.submit(path, 0, len(data), base)) == len(data)
    assert m[: len(data)] == data


def test_a_file_ending_inside_a_later_piece_names_where_it_ended(make_reader: MakeReader,
                                                                 tmp_path: Path) -> None:
    """The request spans several pieces; the error is at the file's end, not a later piece's."""
    path, _ = _file(tmp_path, "short.bin", (9 << 20) + 300)
    _m, base = _buffer(24 << 20)  # _m keeps the mapping alive
    reader = make_reader()

    with pytest.raises(ReadError, match=rf"short\.bin: short read: file ended at offset "
                                        rf"{(9 << 20) + 300}, expected {24 << 20}") as info:
        reader.wait(reader.submit(path, 0, 24 << 20, base))
    assert info.value.errno == errno.EIO and info.value.offset == (9 << 20) + 300


def test_many_chunks_in_flight_fill_an_aligned_buffer(make_reader: MakeReader,
                                                      tmp_path: Path) -> None:
    path, data = _file(tmp_path, "data", 64 * PAGE * 16)
    m, base = _buffer(len(data))
    reader = make_reader(threads=4)
    chunk = 16 * PAGE

    tickets = [reader.submit(path, at, chunk, base + at) for at in range(0, len(data), chunk)]
    got = [reader.wait(t) for t in tickets]

    assert got == [chunk] * len(tickets)
    assert m[: len(data)] == data


def test_chunks_that_do_not_divide_the_file_end_with_a_partial_one(make_reader: MakeReader,
                                                                   tmp_path: Path) -> None:
    path, data = _file(tmp_path, "data", 10 * PAGE + 1234)
    m, base = _buffer(len(data))
    reader = make_reader(threads=3)
    chunk = 3 * PAGE

    tickets = [reader.submit(path, at, min(chunk, len(data) - at), base + at)
               for at in range(0, len(data), chunk)]

    assert sum(reader.wait(t) for t in tickets) == len(data)
    assert m[: len(data)] == data


def test_a_file_smaller_than_one_chunk_is_read_whole(make_reader: MakeReader,
                                                     tmp_path: Path) -> None:
    path, data = _file(tmp_path, "small", 1000)
    m, base = _buffer(PAGE)
    reader = make_reader()

    assert reader.wait(reader.submit(path, 0, len(data), base)) == 1000
    assert m[:1000] == data and m[1000:PAGE] == bytes(PAGE - 1000)


def test_an_empty_read_returns_zero_and_touches_nothing(make_reader: MakeReader,
                                                        tmp_path: Path) -> None:
    path, _ = _file(tmp_path, "data", 100)
    reader = make_reader()

    assert reader.wait(reader.submit(path, 0, 0, 0)) == 0
    assert reader.wait(reader.submit(path, 100, 0, 0)) == 0


def test_unaligned_requests_are_read_correctly(make_reader: MakeReader, tmp_path: Path) -> None:
    path, data = _file(tmp_path, "data", 5 * PAGE + 77)
    m, base = _buffer(8 * PAGE)
    reader = make_reader()
    # (file offset, bytes, dest offset): odd offset, odd address, odd length, aligned but short
    requests = [(1, 3 * PAGE, 0), (PAGE, 2 * PAGE, 3 * PAGE + 3), (4097, 999, 6 * PAGE),
                (0, 100, 7 * PAGE)]

    tickets = [reader.submit(path, off, n, base + at) for off, n, at in requests]

    assert [reader.wait(t) for t in tickets] == [n for _, n, _ in requests]
    for off, n, at in requests:
        assert m[at : at + n] == data[off : off + n]


def test_a_file_on_tmpfs_reads_correctly(make_reader: MakeReader) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="sllm-tmpfs-", dir="/dev/shm"))
    try:
        path, data = _file(folder, "data", 8 * PAGE + 5)
        m, base = _buffer(len(data))
        reader = make_reader(direct=True)

        tickets = [reader.submit(path, at, min(2 * PAGE, len(data) - at), base + at)
                   for at in range(0, len(data), 2 * PAGE)]

        assert sum(reader.wait(t) for t in tickets) == len(data)
        assert m[: len(data)] == data
    finally:
        shutil.rmtree(folder)


def test_a_missing_file_raises_read_error_with_enoent_naming_it(make_reader: MakeReader,
                                                                tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.bin")
    _, base = _buffer(PAGE)
    reader = make_reader()

    with pytest.raises(ReadError, match=r"nope\.bin: cannot open") as info:
        reader.wait(reader.submit(missing, PAGE, PAGE, base))
    assert info.value.errno == errno.ENOENT
    assert info.value.path == missing and info.value.offset == PAGE


def test_a_short_file_raises_read_error_naming_it_and_where_it_ended(make_reader: MakeReader,
                                                                     tmp_path: Path) -> None:
    path, _ = _file(tmp_path, "short.bin", 5000)
    _, base = _buffer(4 * PAGE)
    reader = make_reader()

    with pytest.raises(ReadError, match=r"short\.bin: short read: file ended at offset 5000, "
                                        r"expected 8192") as info:
        reader.wait(reader.submit(path, 0, 2 * PAGE, base))
    assert info.value.errno == errno.EIO
    assert info.value.path == path and info.value.offset == 5000

    with pytest.raises(ReadError, match="file ended at offset 12288") as info:
        reader.wait(reader.submit(path, 3 * PAGE, PAGE, base))
    assert info.value.offset == 3 * PAGE


def test_a_read_error_names_the_offset_where_reading_failed(make_reader: MakeReader,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    _, base = _buffer(PAGE)
    reader = make_reader()

    with pytest.raises(ReadError, match=r"a-folder: cannot read at offset 0: Is a directory") as e:
        reader.wait(reader.submit(str(folder), 0, 100, base))
    assert e.value.errno == errno.EISDIR and e.value.offset == 0


def test_waiting_an_unknown_or_already_waited_ticket_raises_key_error(make_reader: MakeReader,
                                                                      tmp_path: Path) -> None:
    path, _ = _file(tmp_path, "data", 10)
    _, base = _buffer(PAGE)
    reader = make_reader()
    ticket = reader.submit(path, 0, 10, base)
    reader.wait(ticket)

    with pytest.raises(KeyError):
        reader.wait(ticket)
    with pytest.raises(KeyError):
        reader.wait(12345)


@pytest.mark.parametrize(("offset", "nbytes", "dest"), [(-1, 10, 4096), (0, -1, 4096), (0, 10, 0)])
def test_bad_requests_raise_value_error(make_reader: MakeReader, offset: int, nbytes: int,
                                        dest: int) -> None:
    with pytest.raises(ValueError, match="bad read request"):
        make_reader().submit("/some/file", offset, nbytes, dest)


def test_threads_below_one_raise_value_error(make_reader: MakeReader) -> None:
    with pytest.raises(ValueError, match="threads"):
        make_reader(threads=0)


def test_submit_returns_while_the_read_is_still_blocked(make_reader: MakeReader,
                                                        tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: submit must not wait for that."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _, base = _buffer(PAGE)
    reader = make_reader(threads=1)

    ticket = reader.submit(str(fifo), 0, 10, base)  # returns: the worker is blocked in open
    deadline = time.monotonic() + 10
    while True:  # a non-blocking writer can open only once the worker is there reading
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO and time.monotonic() < deadline
            time.sleep(0.01)
    os.close(writer)

    with pytest.raises(ReadError, match="fifo") as info:  # a FIFO cannot be read at an offset
        reader.wait(ticket)
    assert info.value.errno in (errno.ESPIPE, errno.EINVAL)


def test_close_finishes_the_reads_already_queued(make_reader: MakeReader, tmp_path: Path) -> None:
    path, data = _file(tmp_path, "data", 512 * PAGE)
    m, base = _buffer(len(data))
    reader = make_reader(threads=2)
    tickets = [reader.submit(path, at, PAGE, base + at) for at in range(0, len(data), PAGE)]

    reader.close()

    assert m[: len(data)] == data  # no reader thread is left to write later
    assert sum(reader.wait(t) for t in tickets) == len(data)
    with pytest.raises(RuntimeError):
        reader.submit(path, 0, PAGE, base)
    reader.close()  # twice is fine


def _run_clients(client: Callable[[int], None], workers: int) -> None:
    """Run ``client(k)`` for k < workers in that many Python threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            client(k)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_submits_from_several_python_threads(make_reader: MakeReader,
                                                        tmp_path: Path) -> None:
    path, data = _file(tmp_path, "data", 32 * PAGE)
    workers, rounds = 6, 20
    m, base = _buffer(workers * len(data))
    reader = make_reader(threads=3)

    def client(k: int) -> None:
        for i in range(rounds):
            at = (i * 7 % 32) * PAGE
            n = min(3 * PAGE + i, len(data) - at)
            dest = base + k * len(data) + at
            assert reader.wait(reader.submit(path, at, n, dest)) == n

    _run_clients(client, workers)
    for k in range(workers):
        assert m[k * len(data) : (k + 1) * len(data)] == data


def test_read_files_gives_the_same_bytes_with_each_engine(make_reader: MakeReader,
                                                          tmp_path: Path) -> None:
    sizes = [3 * PAGE, 1, 0, 10 * PAGE + 17, 2 * PAGE]
    files = [_file(tmp_path, f"part{i}", n) for i, n in enumerate(sizes)]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + -(-n // PAGE) * PAGE)  # each file at a page boundary
    dest = np.zeros(offsets[-1] + sizes[-1] + PAGE, dtype=np.uint8)
    expected = bytearray(len(dest))
    for (_, data), at in zip(files, offsets, strict=True):
        expected[at : at + len(data)] = data

    n = read_files([(p, at, len(d)) for (p, d), at in zip(files, offsets, strict=True)], dest,
                   chunk_bytes=4 * PAGE, reader=make_reader())

    assert n == sum(sizes)
    assert dest.tobytes() == bytes(expected)


# --- what only the C++ engine has ---------------------------------------------------------------

native = pytest.mark.skipif(NativeReader is None, reason="the C++ engine is not built")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend of the C++ engine that works here."""
    _skip_unless_backend_works(request.param)
    return str(request.param)


@native
def test_the_default_backend_is_io_uring_where_the_kernel_allows_it() -> None:
    try:
        NativeReader(1, True, backend="io_uring").close()
        expected = "io_uring"
    except RuntimeError:
        expected = "threads"
    with NativeReader() as reader:
        assert reader.backend == expected
        assert f"backend='{expected}'" in repr(reader)
    with NativeReader(2, True, backend="threads") as reader:
        assert reader.backend == "threads"


@native
def test_an_unknown_backend_raises_value_error() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        NativeReader(1, True, backend="aio")


@native
def test_the_native_engine_reads_aligned_ranges_with_o_direct(disk_dir: Path,
                                                              backend: str) -> None:
    path, data = _file(disk_dir, "data", 16 * PAGE + 100)
    m, base = _buffer(len(data))

    with NativeReader(2, True, backend=backend) as reader:
        assert reader.direct
        tickets = [reader.submit(path, at, min(4 * PAGE, len(data) - at), base + at)
                   for at in range(0, len(data), 4 * PAGE)]
        assert sum(reader.wait(t) for t in tickets) == len(data)
        # whole pages directly; the file's partial last page through the page cache
        assert (reader.direct_bytes, reader.buffered_bytes) == (16 * PAGE, 100)
    assert m[: len(data)] == data


@native
def test_the_native_engine_reads_buffered_when_o_direct_is_not_asked_for(disk_dir: Path,
                                                                        backend: str) -> None:
    path, data = _file(disk_dir, "data", 4 * PAGE)
    m, base = _buffer(len(data))

    with NativeReader(1, direct=False, backend=backend) as reader:
        assert not reader.direct
        assert reader.wait(reader.submit(path, 0, len(data), base)) == len(data)
        assert (reader.direct_bytes, reader.buffered_bytes) == (0, len(data))
    assert m[: len(data)] == data


@native
def test_the_native_engine_reads_through_the_page_cache_where_o_direct_is_refused(
        backend: str) -> None:
    """procfs refuses O_DIRECT at open (EINVAL), as tmpfs did before Linux 6.6."""
    path = "/proc/version"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        pytest.skip(f"{path} accepts O_DIRECT here")
    except OSError as e:
        if e.errno != errno.EINVAL:
            pytest.skip(f"{path}: {e}")
    with open(path, "rb") as f:
        text = f.read()
    m, base = _buffer(PAGE)

    with NativeReader(1, True, backend=backend) as reader:  # an aligned page: direct is tried first
        with pytest.raises(ReadError, match=f"short read: file ended at offset {len(text)}"):
            reader.wait(reader.submit(path, 0, PAGE, base))
        assert (reader.direct_bytes, reader.buffered_bytes) == (0, len(text))
    assert m[: len(text)] == text


@native
def test_a_large_direct_read_goes_through_o_direct_in_pieces(disk_dir: Path, backend: str) -> None:
    path, data = _file(disk_dir, "data", (20 << 20) + 100)
    m, base = _buffer(len(data))

    with NativeReader(2, True, backend=backend) as reader:
        assert reader.wait(reader.submit(path, 0, len(data), base)) == len(data)
        assert (reader.direct_bytes, reader.buffered_bytes) == (20 << 20, 100)
    assert m[: len(data)] == data


def test_several_python_threads_each_keep_many_requests_in_flight(make_reader: MakeReader,
                                                                  tmp_path: Path) -> None:
    path, data = _file(tmp_path, "data", 64 * PAGE)
    workers = 8
    m, base = _buffer(workers * len(data))
    reader = make_reader(threads=3)
    start = threading.Barrier(workers)

    def client(k: int) -> None:
        start.wait()
        at0 = base + k * len(data)
        tickets = [reader.submit(path, at, PAGE, at0 + at) for at in range(0, len(data), PAGE)]
        assert [reader.wait(t) for t in tickets] == [PAGE] * len(tickets)

    _run_clients(client, workers)
    for k in range(workers):
        assert m[k * len(data) : (k + 1) * len(data)] == data


def test_choose_engine_follows_what_was_asked_for_and_what_is_built() -> None:
    built = "native" if native_loader.NATIVE else "python"
    assert native_loader.choose_engine("python") == ("python", None)
    assert native_loader.choose_engine("auto")[0] == built
    running, problem = native_loader.choose_engine("native")
    assert running == built and (problem is None) == native_loader.NATIVE
    with pytest.raises(ValueError, match="unknown I/O engine"):
        native_loader.choose_engine("fast")
    with native_loader.default_reader(1, engine="python") as reader:
        assert isinstance(reader, native_loader.PyReader)
