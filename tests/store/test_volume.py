"""Volume I/O: unaligned reads and writes, buffers, bounds, block status, the file object."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

import cowstore
from cowstore import Extent, errors
from tests.conftest import CHUNK


def test_unaligned_writes_across_chunks_read_back(store):
    vol = store.prepare("a")
    data = os.urandom(3 * CHUNK + 123)
    vol.pwrite(data, CHUNK - 7)
    assert vol.pread(len(data), CHUNK - 7) == data
    assert vol.pread(7, CHUNK - 14) == bytes(7)


def test_unwritten_ranges_read_as_zeros(store):
    vol = store.prepare("a")
    assert vol.pread(3 * CHUNK, 5) == bytes(3 * CHUNK)


def test_pwrite_accepts_any_buffer(store):
    vol = store.prepare("a")
    assert vol.pwrite(bytearray(b"ab"), 0) == 2
    assert vol.pwrite(memoryview(b"xxcdxx")[2:4], 2) == 2
    assert vol.pwrite(np.array([0x65666768], dtype="<u4"), 4) == 4
    assert vol.pwrite(np.arange(4, dtype=np.uint8).reshape(2, 2), 8) == 4
    assert vol.pread(12, 0) == b"abcdhgfe\0\1\2\3"


def test_preadinto_fills_any_writable_buffer(store):
    vol = store.prepare("a")
    vol.pwrite(bytes(range(16)), 100)
    buf = bytearray(8)
    assert vol.preadinto(buf, 100) == 8 and buf == bytes(range(8))
    arr = np.zeros(4, dtype=np.uint16)
    assert vol.preadinto(arr, 108) == 8 and arr.tobytes() == bytes(range(8, 16))
    mv = memoryview(bytearray(10))
    vol.preadinto(mv[2:6], 102)
    assert bytes(mv) == b"\0\0\2\3\4\5\0\0\0\0"


def test_a_strided_buffer_is_copied_for_a_write_and_refused_for_a_read(store):
    vol = store.prepare("a")
    assert vol.pwrite(memoryview(b"a-b-c-d-")[::2], 0) == 4
    assert vol.pwrite(np.arange(8, dtype=np.uint8)[::2], 4) == 4
    assert vol.pread(8, 0) == b"abcd\0\2\4\6"
    with pytest.raises(errors.InvalidArgument, match="contiguous"):
        vol.preadinto(memoryview(bytearray(8))[::2], 0)


@pytest.mark.parametrize(("offset", "length"), [(0, True), (True, 1), (False, 0)])
def test_bools_are_neither_offsets_nor_lengths(store, offset, length):
    vol = store.prepare("a")
    with pytest.raises(errors.InvalidArgument):
        vol.pread(length, offset)
    with pytest.raises(errors.InvalidArgument):
        vol.write_zeroes(offset, length)


def test_a_closed_file_object_refuses_io(store):
    vol = store.prepare("a")
    vol.pwrite(b"data", 0)
    f = vol.file()
    f.close()
    for call in (lambda: f.read(4), lambda: f.write(b"x"), lambda: f.seek(0), f.tell):
        with pytest.raises(errors.Closed):
            call()
    assert vol.pread(4, 0) == b"data"


def test_preadinto_rejects_read_only_buffers(store):
    vol = store.prepare("a")
    with pytest.raises(errors.InvalidArgument):
        vol.preadinto(b"immutable", 0)


@pytest.mark.parametrize("data", ["text", 5, None, [1, 2]])
def test_pwrite_rejects_non_buffers(store, data):
    with pytest.raises(errors.InvalidArgument):
        store.prepare("a").pwrite(data, 0)


@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 1), (0, -1), ("0", 1), (1 << 20, 1), ((1 << 20) - 1, 2), (0, (1 << 20) + 1)]
)
def test_io_outside_the_volume_raises_invalid_argument(store, offset, length):
    vol = store.prepare("a")
    with pytest.raises(errors.InvalidArgument):
        vol.pread(length, offset)
    with pytest.raises(errors.InvalidArgument):
        vol.write_zeroes(offset, length)
    if isinstance(length, int) and length >= 0 and isinstance(offset, int):
        with pytest.raises(errors.InvalidArgument):
            vol.pwrite(bytes(length), offset)


def test_io_at_the_exact_end_is_allowed(store):
    vol = store.prepare("a", size=2 * CHUNK + 10)
    vol.pwrite(b"end", vol.size - 3)
    assert vol.pread(3, vol.size - 3) == b"end"
    assert vol.pread(0, vol.size) == b""


def test_write_into_a_shared_chunk_copies_it_and_leaves_the_parent_intact(store):
    base = store.prepare("a")
    original = os.urandom(2 * CHUNK)
    base.pwrite(original, 0)
    store.commit("img", "a")
    c1, c2 = store.prepare("c1", "img"), store.prepare("c2", "img")
    c1.pwrite(b"one", 10)
    c2.pwrite(b"two", CHUNK + 10)
    assert c1.pread(2 * CHUNK, 0) == original[:10] + b"one" + original[13:]
    assert c2.pread(2 * CHUNK, 0) == original[: CHUNK + 10] + b"two" + original[CHUNK + 13 :]
    assert store.view("v", "img").pread(2 * CHUNK, 0) == original


def test_discard_in_a_child_hides_parent_data_only_in_the_child(store):
    base = store.prepare("a")
    base.pwrite(b"p" * (2 * CHUNK), 0)
    store.commit("img", "a")
    child = store.prepare("c", "img")
    child.discard(0, CHUNK + 10)
    assert child.pread(2 * CHUNK, 0) == bytes(CHUNK + 10) + b"p" * (CHUNK - 10)
    assert store.view("v", "img").pread(2 * CHUNK, 0) == b"p" * (2 * CHUNK)


def test_block_status_reports_depth_allocation_and_zero(store):
    a = store.prepare("a")
    a.pwrite(b"1" * CHUNK, 0)
    store.commit("l1", "a")
    b = store.prepare("b", "l1")
    b.pwrite(b"2", CHUNK)
    store.commit("l2", "b")
    top = store.prepare("top", "l2")
    top.pwrite(b"3", 2 * CHUNK)
    top.discard(0, CHUNK)
    assert top.block_status(0, 4 * CHUNK) == [
        Extent(0, CHUNK, allocated=False, zero=True, depth=1),
        Extent(CHUNK, CHUNK, allocated=True, zero=False, depth=2),
        Extent(2 * CHUNK, CHUNK, allocated=True, zero=False, depth=1),
        Extent(3 * CHUNK, CHUNK, allocated=False, zero=True, depth=0),
    ]
    view = store.view("v", "l2")
    assert [(e.offset, e.length, e.depth) for e in view.block_status(10, CHUNK)] == [
        (10, CHUNK - 10, 3),
        (CHUNK, 10, 2),
    ]


def test_block_status_merges_runs_and_covers_the_whole_volume(store):
    vol = store.prepare("a", size=10 * CHUNK)
    vol.pwrite(b"x" * (3 * CHUNK), 2 * CHUNK)
    extents = vol.block_status()
    assert [(e.offset, e.length, e.allocated) for e in extents] == [
        (0, 2 * CHUNK, False),
        (2 * CHUNK, 3 * CHUNK, True),
        (5 * CHUNK, 5 * CHUNK, False),
    ]


def test_file_object_reads_writes_and_seeks(store):
    vol = store.prepare("a", size=4 * CHUNK)
    with vol.file() as f:
        assert isinstance(f, io.RawIOBase) and f.seekable() and f.writable()
        f.seek(CHUNK - 2)
        f.write(b"hello")
        assert f.tell() == CHUNK + 3
        f.seek(-3, io.SEEK_CUR)
        assert f.read(3) == b"llo"
        assert f.seek(0, io.SEEK_END) == 4 * CHUNK
        assert f.read(10) == b""
    reader = io.BufferedReader(vol.file())
    reader.seek(CHUNK - 2)
    assert reader.read(5) == b"hello"
    assert len(vol.file().readall()) == 4 * CHUNK


def test_file_object_refuses_writes_past_the_end(store):
    vol = store.prepare("a", size=CHUNK)
    f = vol.file()
    f.seek(CHUNK - 1)
    with pytest.raises(errors.InvalidArgument):
        f.write(b"ab")


def test_closed_volume_refuses_io(store):
    vol = store.prepare("a")
    with vol:
        vol.pwrite(b"x", 0)
    with pytest.raises(errors.Closed):
        vol.pread(1, 0)
    assert store.mounts("a").pread(1, 0) == b"x"


def test_a_volume_that_outlives_its_store_cannot_touch_the_data(engine, tmp_path):
    path = tmp_path / "s"
    store = cowstore.open(path, create=True, chunk_size=CHUNK, engine=engine)
    vol = store.prepare("a", size=4 * CHUNK)
    vol.pwrite(b"x" * CHUNK, 0)
    store.close()
    before = (path / "data").read_bytes()
    with pytest.raises(errors.Closed):
        vol.pwrite(b"late", 10)
    with pytest.raises(errors.Closed):
        vol.pread(4, 0)
    with pytest.raises(errors.Closed):
        vol.block_status()
    assert (path / "data").read_bytes() == before
    with cowstore.open(path, engine=engine) as again:
        assert again.mounts("a").pread(CHUNK, 0) == b"x" * CHUNK


def test_volumes_of_either_engine_are_volumes(store):
    vol = store.prepare("a")
    assert isinstance(vol, cowstore.Volume)
    assert (vol.key, vol.size, vol.readonly, vol.closed) == ("a", store.default_size, False, False)
    with pytest.raises(AttributeError):
        vol.size = 1  # type: ignore[misc]


def test_store_map_reports_committed_snapshots_from_their_own_depth(store):
    vol = store.prepare("a", size=4 * CHUNK)
    vol.pwrite(b"x", CHUNK)
    store.commit("c", "a")
    assert [(e.offset, e.length, e.depth) for e in store.map("c")] == [
        (0, CHUNK, 0),
        (CHUNK, CHUNK, 1),
        (2 * CHUNK, 2 * CHUNK, 0),
    ]
    with pytest.raises(errors.InvalidArgument):
        store.map("c", 0, 5 * CHUNK)


def test_store_diff_lists_the_chunks_that_differ(store):
    vol = store.prepare("a", size=8 * CHUNK)
    vol.pwrite(b"x" * CHUNK, 0)
    store.commit("c", "a")
    child = store.prepare("b", "c")
    child.pwrite(b"y", 2 * CHUNK)
    child.pwrite(b"y", 3 * CHUNK)
    child.discard(0, CHUNK)
    child.pwrite(b"z", 6 * CHUNK)
    assert store.diff("c", "b") == [(0, CHUNK), (2 * CHUNK, 2 * CHUNK), (6 * CHUNK, CHUNK)]
    assert store.diff("b", "b") == []
