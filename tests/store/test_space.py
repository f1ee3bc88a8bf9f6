"""Space: pool totals, the pool limit, giving space back, and the integrity check."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys

import pytest

import cowstore
from cowstore import errors, metadata
from tests.conftest import CHUNK, SIZE


def test_stats_count_used_free_pending_and_sharing(store):
    vol = store.prepare("a")
    vol.pwrite(b"x" * (4 * CHUNK), 0)
    store.commit("img", "a")
    store.prepare("c1", "img")
    store.prepare("c2", "img").pwrite(b"y", 0)
    stats = store.stats()
    assert (stats.chunk_size, stats.slots, stats.used, stats.snapshots) == (CHUNK, 5, 5, 3)
    assert stats.logical_bytes == 12 * CHUNK
    assert stats.sharing_ratio == pytest.approx(12 / 5)
    store.prepare("c2-gone", "img")
    store.mounts("c2").discard(0, CHUNK)
    assert store.stats().pending == 1
    store.flush()
    assert (store.stats().pending, store.stats().free) == (0, 1)


def test_pool_limit_refuses_new_chunks_with_no_space_and_harms_nothing(engine):
    store = cowstore.memory(chunk_size=CHUNK, default_size=SIZE, max_bytes=3 * CHUNK, engine=engine)
    vol = store.prepare("a")
    vol.pwrite(b"a" * (3 * CHUNK), 0)
    with pytest.raises(errors.NoSpace) as info:
        vol.pwrite(b"b", 5 * CHUNK)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    vol.pwrite(b"in place", 10)
    assert vol.pread(3 * CHUNK, 0) == b"a" * 10 + b"in place" + b"a" * (3 * CHUNK - 18)
    vol.discard(0, CHUNK)
    vol.pwrite(b"b", 5 * CHUNK)
    assert vol.pread(1, 5 * CHUNK) == b"b"
    assert store.check().ok


def test_a_write_that_does_not_fit_says_how_many_chunks_it_needs_and_how_many_are_left(engine):
    store = cowstore.memory(chunk_size=CHUNK, default_size=SIZE, max_bytes=2 * CHUNK, engine=engine)
    with pytest.raises(errors.NoSpace, match="needs 3 new chunks of 4096 bytes and 2 are left"):
        store.prepare("a").pwrite(b"x" * (3 * CHUNK), 0)


def test_pool_limit_is_kept_across_reopen(disk_store, tmp_path):
    s = disk_store(max_bytes=2 * CHUNK)
    s.close()
    s = disk_store()
    assert s.max_bytes == 2 * CHUNK
    with pytest.raises(errors.NoSpace):
        s.prepare("a").pwrite(b"z" * (3 * CHUNK), 0)


def test_compact_gives_space_back_after_removes(disk_store, tmp_path):
    s = disk_store()
    vol = s.prepare("a")
    vol.pwrite(os.urandom(64 * CHUNK), 0)
    s.prepare("b").pwrite(os.urandom(8 * CHUNK), 0)
    s.flush()
    data = tmp_path / "store" / "data"
    full = os.stat(data).st_blocks * 512
    s.remove("a")
    s.flush()
    assert s.compact() >= 64 * CHUNK
    assert os.stat(data).st_blocks * 512 <= full - 60 * CHUNK
    assert s.mounts("b").pread(CHUNK, 0) != bytes(CHUNK)
    report = s.check()
    assert report.ok and report.leaks == 0


def test_a_growing_pool_reserves_blocks_ahead_and_close_gives_them_back(disk_store, tmp_path):
    data = tmp_path / "store" / "data"
    s = disk_store()
    s.prepare("a").pwrite(b"x" * CHUNK, 0)
    reserved = _require_reservation(data)
    assert os.stat(data).st_size == CHUNK
    s.prepare("b").pwrite(b"y" * CHUNK, 0)
    assert os.stat(data).st_blocks * 512 == reserved  # the second chunk's blocks were reserved
    s.close()
    assert os.stat(data).st_size == 2 * CHUNK
    assert os.stat(data).st_blocks * 512 <= 2 * CHUNK
    s = disk_store()
    assert s.mounts("a").pread(1, 0) == b"x" and s.mounts("b").pread(1, 0) == b"y"
    assert s.check().ok


def test_close_gives_back_a_reservation_that_a_crash_left_behind(engine, tmp_path):
    path = tmp_path / "store"
    crash = (
        "import os, cowstore\n"
        f"s = cowstore.open({str(path)!r}, create=True, chunk_size={CHUNK}, engine={engine!r})\n"
        "s.prepare('a').pwrite(b'x' * 4096, 0)\n"
        "s.flush()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash], check=True)
    data = path / "data"
    _require_reservation(data)
    s = cowstore.open(path, engine=engine)
    assert s.mounts("a").pread(4, 0) == b"xxxx"
    s.close()
    assert os.stat(data).st_blocks * 512 <= os.stat(data).st_size + 4096


def _require_reservation(data) -> int:
    """The bytes allocated to the data file, which holds a reservation of at least 1 MiB;
    skips where the file system cannot reserve blocks at all."""
    allocated = os.stat(data).st_blocks * 512
    if allocated < 1 << 20:
        fd = os.open(data, os.O_RDWR)
        try:
            can = cowstore.fallocate.preallocate(fd, 0, 1 << 20)
        finally:
            os.close(fd)
        assert not can, f"only {allocated} bytes allocated for a growing pool"
        pytest.skip("the file system cannot reserve blocks")
    return allocated


def test_check_of_a_healthy_store_is_clean(store):
    vol = store.prepare("a")
    vol.pwrite(os.urandom(5 * CHUNK), 100)
    store.commit("c", "a")
    store.prepare("b", "c").pwrite(b"x", 0)
    report = store.check(data=True)
    assert report.ok, report.problems
    assert (report.snapshots, report.referenced_slots) == (2, 7)
    assert report.chunks_read == 7


def test_check_reports_freed_space_as_free_not_leaked_until_compacted(disk_store):
    s = disk_store()
    s.prepare("a").pwrite(os.urandom(4 * CHUNK), 0)
    s.prepare("b").pwrite(os.urandom(4 * CHUNK), 0)
    s.remove("a")
    report = s.check()
    assert report.ok and report.leaks == 0
    assert len(report.reclaimable_slots) == 4 == s.stats().free
    assert s.repair().reclaimable_slots == []


def test_a_chunk_freed_by_writing_zeros_is_free_to_check_as_to_stats(disk_store):
    s = disk_store()
    vol = s.prepare("a")
    vol.pwrite(b"x" * 100, 0)
    vol.pwrite(bytes(CHUNK), 0)
    s.flush()
    report = s.check()
    assert report.ok and report.leaks == 0
    assert report.reclaimable_slots == [1] and s.stats().free == 1


def test_check_finds_a_page_naming_a_slot_past_the_data_file(disk_store, tmp_path):
    s = disk_store()
    s.prepare("a").pwrite(b"x" * CHUNK, 0)
    s.close()
    os.truncate(tmp_path / "store" / "data", 0)
    with pytest.raises(errors.Corruption):
        disk_store()


def _flip_committed_chunk(path, slot_offset=0):
    with open(path / "data", "r+b") as f:
        f.seek(slot_offset + 17)
        byte = f.read(1)
        f.seek(slot_offset + 17)
        f.write(bytes([byte[0] ^ 0x40]))


def test_verify_reads_raises_corruption_naming_snapshot_and_offset(disk_store, tmp_path):
    s = disk_store()
    s.prepare("a").pwrite(b"q" * CHUNK, 0)
    s.commit("img", "a")
    s.close()
    _flip_committed_chunk(tmp_path / "store")
    s = disk_store(verify_reads=True)
    child = s.prepare("child", "img")
    with pytest.raises(errors.Corruption, match=r"'child'.* offset 5"):
        child.pread(10, 5)
    report = s.check(data=True)
    assert not report.ok and "checksum" in report.problems[0].what
    with pytest.raises(errors.Corruption):
        s.repair()
    s.close()
    s = disk_store(verify_reads=False)
    assert s.view("v", "img").pread(CHUNK, 0) != b"q" * CHUNK


def test_chunks_written_in_place_after_commit_get_fresh_sums(disk_store):
    s = disk_store(verify_reads=True)
    a = s.prepare("a")
    a.pwrite(os.urandom(3 * CHUNK), 0)
    s.commit("img", "a")
    b = s.prepare("b", "img")
    b.pwrite(b"new", 10)
    b.pwrite(b"again", 20)
    s.commit("img2", "b")
    view = s.view("v", "img2")
    assert view.pread(8, 20)[:5] == b"again"
    assert s.check(data=True).ok


def test_a_full_metadata_disk_is_no_space_without_python_3_11s_sqlite_codes(monkeypatch):
    """Python 3.10's sqlite3 has no SQLITE_FULL and no sqlite_errorcode: a full disk is still
    NoSpace (it was an AttributeError), and another failure still a plain Error."""
    monkeypatch.delattr(sqlite3, "SQLITE_FULL", raising=False)
    meta = metadata.Metadata(":memory:")
    try:
        with pytest.raises(errors.NoSpace), meta.transaction():
            raise sqlite3.OperationalError("database or disk is full")
        with pytest.raises(errors.Error) as failed, meta.transaction():
            raise sqlite3.OperationalError("disk I/O error")
        assert not isinstance(failed.value, errors.NoSpace)
    finally:
        meta.close()
