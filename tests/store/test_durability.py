"""What survives close, reopen and a crash; store creation, settings and the lock."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

import cowstore
from cowstore import errors
from tests.conftest import CHUNK, ENGINE_PARAMS, SIZE


def crash_copy(src, dst):
    """The store's files as a power cut would leave them if the page cache survived."""
    dst.mkdir()
    for name in os.listdir(src):
        if name != "lock":
            shutil.copyfile(src / name, dst / name)
    return dst


def build_chain(s):
    a = s.prepare("a", labels={"k": "v"})
    a.pwrite(b"base" * 2000, 100)
    s.commit("img", "a", labels={"layer": "0"})
    c = s.prepare("ctr", "img")
    c.pwrite(b"top", 5)
    s.view("v", "img")
    return c


def test_reopen_gives_back_every_snapshot_and_byte(disk_store):
    s = disk_store()
    build_chain(s)
    infos = list(s.walk())
    data = {i.name: s.mounts(i.name).pread(3 * CHUNK, 0) for i in infos if i.kind.value != "committed"}
    s.close()
    s = disk_store()
    assert list(s.walk()) == infos
    for key, expected in data.items():
        assert s.mounts(key).pread(3 * CHUNK, 0) == expected
    assert s.usage("ctr").chunks == 1


@pytest.mark.parametrize("other", ENGINE_PARAMS)
def test_each_engine_reads_a_store_the_other_wrote(engine, other, tmp_path):
    with cowstore.open(tmp_path / "s", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine) as s:
        build_chain(s)
        payload = os.urandom(5 * CHUNK)
        s.mounts("ctr").pwrite(payload, 3 * CHUNK + 1)
        expected = s.mounts("ctr").pread(SIZE, 0)
    with cowstore.open(tmp_path / "s", engine=other) as s:
        assert s.mounts("ctr").pread(SIZE, 0) == expected
        s.mounts("ctr").pwrite(b"again", 0)
        s.commit("top", "ctr")
    with cowstore.open(tmp_path / "s", engine=engine) as s:
        assert s.view("w", "top").pread(5, 0) == b"again"


def test_a_flush_syncs_only_when_something_was_written_since_the_last(disk_store, monkeypatch):
    s = disk_store()
    v = s.prepare("a")
    v.pwrite(b"x" * CHUNK, 0)
    real, syncs = s._engine, []

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def flush_data(self):
            syncs.append(real.writes)
            real.flush_data()

    monkeypatch.setattr(s, "_engine", Counting())
    s.flush()
    s.flush()
    assert len(syncs) == 1
    v.pwrite(b"y" * 10, 5)  # into the snapshot's own chunk: no map change, data to sync
    s.flush()
    s.flush()
    assert len(syncs) == 2
    s.update(dataclasses.replace(s.stat("a"), labels={"k": "v"}))  # a row with no data to sync
    assert len(syncs) == 2
    v.pwrite(b"z", 7)
    s.update(dataclasses.replace(s.stat("a"), labels={"k": "w"}))  # the data goes before the row
    assert len(syncs) == 3


def test_flushed_writes_survive_a_crash_and_unflushed_ones_never_corrupt(disk_store, tmp_path):
    s = disk_store()
    vol = s.prepare("a")
    vol.pwrite(b"flushed", 0)
    vol.flush()
    vol.pwrite(b"later!!", 0)
    crashed = cowstore.open(crash_copy(tmp_path / "store", tmp_path / "crash"))
    assert crashed.mounts("a").pread(7, 0) in (b"flushed", b"later!!")
    crashed.close()


def test_freed_slot_is_not_reused_before_its_freeing_is_durable(disk_store, tmp_path):
    s = disk_store()
    vol = s.prepare("a")
    vol.pwrite(b"old" * (CHUNK // 3), 0)
    s.flush()
    vol.discard(0, CHUNK)
    vol.pwrite(b"new" * (CHUNK // 3), 5 * CHUNK)
    crashed = cowstore.open(crash_copy(tmp_path / "store", tmp_path / "crash"))
    assert crashed.mounts("a").pread(3, 0) == b"old"
    crashed.close()
    s.flush()
    vol.pwrite(b"reuse" * 10, 7 * CHUNK)
    assert s._engine.stats()["slots"] == 2


def test_committed_snapshot_is_durable_when_commit_returns(disk_store, tmp_path):
    s = disk_store()
    s.prepare("a").pwrite(b"image", 0)
    s.commit("img", "a")
    crashed = cowstore.open(crash_copy(tmp_path / "store", tmp_path / "crash"))
    assert crashed.view("v", "img").pread(5, 0) == b"image"
    crashed.close()


def test_reopen_with_different_settings_raises_invalid_argument(disk_store, tmp_path):
    disk_store().close()
    with pytest.raises(errors.InvalidArgument, match="chunk_size"):
        cowstore.open(tmp_path / "store", chunk_size=8192)
    with pytest.raises(errors.InvalidArgument, match="default_size"):
        cowstore.open(tmp_path / "store", default_size=SIZE * 2)
    with cowstore.open(tmp_path / "store", chunk_size=CHUNK) as s:
        assert (s.chunk_size, s.default_size) == (CHUNK, SIZE)


@pytest.mark.parametrize("chunk_size", [0, 1000, 2048, 1 << 21, 3 * 4096, "4096"])
def test_bad_chunk_sizes_are_refused(tmp_path, chunk_size):
    with pytest.raises(errors.InvalidArgument):
        cowstore.open(tmp_path / "s", create=True, chunk_size=chunk_size)
    with pytest.raises(errors.InvalidArgument):
        cowstore.memory(chunk_size=chunk_size)
    assert not (tmp_path / "s").exists()


def test_open_without_create_of_a_missing_store_raises_not_found(tmp_path):
    with pytest.raises(errors.NotFound):
        cowstore.open(tmp_path / "nothing")


def test_open_of_a_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "file").write_text("mine")
    with pytest.raises(errors.InvalidArgument):
        cowstore.open(tmp_path / "d")
    with pytest.raises(errors.InvalidArgument):
        cowstore.open(tmp_path / "d", create=True)
    assert os.listdir(tmp_path / "d") == ["file"]


def test_create_in_an_empty_directory_and_leaves_no_temporary_files(tmp_path):
    (tmp_path / "d").mkdir()
    cowstore.open(tmp_path / "d", create=True).close()
    cowstore.open(tmp_path / "d", create=True).close()
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert {"data", "meta.sqlite"} <= set(os.listdir(tmp_path / "d"))


def test_damaged_or_foreign_metadata_raises_corruption(tmp_path):
    cowstore.open(tmp_path / "s", create=True).close()
    (tmp_path / "s" / "meta.sqlite").write_bytes(b"this is not sqlite" * 100)
    for name in ("meta.sqlite-wal", "meta.sqlite-shm"):
        (tmp_path / "s" / name).unlink(missing_ok=True)
    with pytest.raises(errors.Corruption):
        cowstore.open(tmp_path / "s")


def test_missing_data_file_raises_corruption(tmp_path):
    cowstore.open(tmp_path / "s", create=True).close()
    (tmp_path / "s" / "data").unlink()
    with pytest.raises(errors.Corruption, match="data"):
        cowstore.open(tmp_path / "s")


def test_newer_format_version_is_refused(tmp_path):
    import sqlite3

    cowstore.open(tmp_path / "s", create=True).close()
    db = sqlite3.connect(tmp_path / "s" / "meta.sqlite")
    db.execute("UPDATE settings SET value = 99 WHERE name = 'version'")
    db.commit()
    db.close()
    with pytest.raises(errors.InvalidArgument, match="version 99"):
        cowstore.open(tmp_path / "s")


def test_second_open_in_this_process_is_locked(disk_store, tmp_path):
    disk_store()
    with pytest.raises(errors.Locked, match=str(os.getpid())):
        cowstore.open(tmp_path / "store")


def test_second_process_gets_locked_with_the_holders_pid(disk_store, tmp_path):
    disk_store()
    code = (
        "import sys, cowstore\n"
        "try:\n    cowstore.open(sys.argv[1])\n"
        "except cowstore.errors.Locked as e:\n    print('LOCKED', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True
    )
    assert out.stdout.startswith("LOCKED") and str(os.getpid()) in out.stdout, out.stderr


def test_lock_is_released_on_close(disk_store):
    disk_store().close()
    disk_store().close()


def test_partial_chunks_survive_reopen_and_commit_makes_them_whole(disk_store, tmp_path):
    s = disk_store()
    data_file = tmp_path / "store" / "data"
    base = s.prepare("base", size=4 * CHUNK)
    base.pwrite(b"b" * 4 * CHUNK, 0)
    s.commit("layer", "base")
    before = data_file.stat().st_size
    top = s.prepare("top", "layer")
    top.pwrite(b"new", CHUNK + 20)
    top.flush()
    # The copy on write took the sub-block written (1/32 of the chunk), not the chunk.
    assert data_file.stat().st_size - before == CHUNK // 32
    want = bytearray(b"b" * 4 * CHUNK)
    want[CHUNK + 20 : CHUNK + 23] = b"new"
    s.close()
    again = disk_store()
    assert again.mounts("top").pread(4 * CHUNK, 0) == want
    assert again.check(data=True).ok
    again.commit("done", "top")
    assert again.reader("done").pread(4 * CHUNK, 0) == want
    again.close()
    last = disk_store(verify_reads=True)
    assert last.reader("done").pread(4 * CHUNK, 0) == want
    assert last.check(data=True).ok
