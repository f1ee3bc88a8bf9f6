"""`Store.resize`: an active snapshot grows; the new bytes read as zeros, the growth is
durable when it returns, and a child of the grown snapshot has its size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import cowstore
from cowstore import errors, metadata
from tests.conftest import CHUNK, SIZE
from tests.store.test_durability import crash_copy

BIG = 3 * SIZE + 5 * CHUNK


def test_grow_then_write_and_read_past_the_old_end(store):
    vol = store.prepare("a")
    vol.pwrite(b"head", 0)
    vol.pwrite(b"tail", SIZE - 4)
    store.resize("a", BIG)
    assert store.stat("a").size == BIG
    grown = store.mounts("a")
    assert grown.size == BIG
    assert grown.pread(SIZE + 100, 0) == b"head" + bytes(SIZE - 8) + b"tail" + bytes(100)
    grown.pwrite(b"past the old end", SIZE + 7)
    grown.pwrite(b"last", BIG - 4)
    assert grown.pread(16, SIZE + 7) == b"past the old end"
    assert grown.pread(4, BIG - 4) == b"last"
    assert grown.pread(BIG - SIZE - 23 - 4, SIZE + 23) == bytes(BIG - SIZE - 23 - 4)
    assert store.check(data=True).ok


def test_volumes_already_open_keep_their_old_size(store):
    vol = store.prepare("a")
    store.resize("a", BIG)
    assert vol.size == SIZE
    with pytest.raises(errors.InvalidArgument):
        vol.pwrite(b"x", SIZE)
    vol.pwrite(b"still works", 0)
    assert store.mounts("a").pread(11, 0) == b"still works"


def test_a_size_that_is_not_a_chunk_multiple_grows_with_zeros_in_its_last_chunk(store):
    odd = 3 * CHUNK + 100
    vol = store.prepare("odd", size=odd)
    vol.pwrite(b"\xff" * 100, 3 * CHUNK)
    # Stale bytes past the end inside the last chunk (volumes never write there) must not
    # show once the snapshot grows.
    store._engine.write(store._snapshots["odd"].id, b"stale", odd + 10)
    store.resize("odd", 3 * CHUNK + 200)
    assert store.mounts("odd").pread(200, 3 * CHUNK) == b"\xff" * 100 + bytes(100)
    store.resize("odd", 9 * CHUNK + 1)
    assert store.mounts("odd").pread(6 * CHUNK - 199, 3 * CHUNK + 200) == bytes(6 * CHUNK - 199)
    assert store.check().ok


def test_a_child_grows_past_its_parent_and_its_grandchild_has_the_new_size(store):
    base = store.prepare("base")
    base.pwrite(b"B" * (CHUNK + 10), SIZE - CHUNK - 10)
    store.commit("img", "base")
    child = store.prepare("child", "img")
    child.pwrite(b"c", 3)  # a partial copy on write below the parent's end
    store.resize("child", BIG)
    grown = store.mounts("child")
    # First writes past the parent's end, small (a partial chunk) and whole.
    grown.pwrite(b"small", SIZE + 50)
    grown.pwrite(b"W" * CHUNK, SIZE + 2 * CHUNK)
    # A write that straddles the parent's end.
    grown.pwrite(b"xy", SIZE - 1)
    assert grown.pread(8, 0) == b"\0\0\0c\0\0\0\0"
    assert grown.pread(CHUNK + 10, SIZE - CHUNK - 10) == b"B" * (CHUNK + 9) + b"x"
    assert grown.pread(60, SIZE) == b"y" + bytes(49) + b"small" + bytes(5)
    assert store.usage("child").chunks == 4
    assert [e.length for e in store.map("child") if e.allocated][-1] == CHUNK
    store.commit("grown", "child")
    grandchild = store.prepare("grandchild", "grown")
    assert grandchild.size == BIG == store.stat("grandchild").size
    assert grandchild.pread(5, SIZE + 50) == b"small"
    assert grandchild.pread(CHUNK, SIZE + 2 * CHUNK) == b"W" * CHUNK
    assert store.view("v", "grown").size == BIG
    assert store.diff("img", "grown")[-1] == (SIZE + 2 * CHUNK, CHUNK)
    assert store.check(data=True).ok


def test_growth_is_durable_across_close_and_reopen(disk_store):
    s = disk_store()
    s.prepare("base").pwrite(b"base", 0)
    s.commit("img", "base")
    s.prepare("child", "img")
    s.resize("child", BIG)
    s.mounts("child").pwrite(b"beyond", BIG - 6)
    s.close()
    s = disk_store()
    assert s.stat("child").size == BIG
    vol = s.mounts("child")
    assert vol.pread(4, 0) == b"base"
    assert vol.pread(6, BIG - 6) == b"beyond"
    assert vol.pread(SIZE, SIZE) == bytes(SIZE)
    assert s.check(data=True).ok
    assert s.stat("img").size == SIZE


def test_growth_is_durable_when_resize_returns(disk_store, tmp_path):
    s = disk_store()
    s.prepare("a").pwrite(b"data", SIZE - 4)
    s.resize("a", BIG)
    crashed = cowstore.open(crash_copy(tmp_path / "store", tmp_path / "crash"))
    assert crashed.stat("a").size == BIG
    assert crashed.mounts("a").pread(8, SIZE - 4) == b"data" + bytes(4)
    assert crashed.check().ok
    crashed.close()


def test_a_process_killed_after_a_resize_and_flush_keeps_both(engine, tmp_path):
    path = tmp_path / "store"
    cowstore.open(path, create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine).close()
    script = (
        "import sys, time, cowstore\n"
        f"s = cowstore.open({str(path)!r}, engine={engine!r})\n"
        "s.prepare('base').pwrite(b'base', 0)\n"
        "s.commit('img', 'base')\n"
        "s.prepare('a', 'img')\n"
        f"s.resize('a', {BIG})\n"
        "v = s.mounts('a')\n"
        f"v.pwrite(b'flushed', {BIG - 7})\n"
        "v.flush()\n"
        f"v.pwrite(b'unflushed', {SIZE})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    with cowstore.open(path, engine=engine) as s:
        assert s.stat("a").size == BIG
        vol = s.mounts("a")
        assert vol.pread(7, BIG - 7) == b"flushed"
        assert vol.pread(4, 0) == b"base"
        assert vol.pread(9, SIZE) in (b"unflushed", bytes(9))
        assert s.check().ok


def test_refusals(store):
    store.prepare("a").close()
    store.commit("img", "a")
    store.view("v", "img")
    store.prepare("b", "img")
    with pytest.raises(errors.InvalidArgument, match="cannot shrink"):
        store.resize("b", SIZE - CHUNK)
    with pytest.raises(errors.FailedPrecondition, match="committed"):
        store.resize("img", BIG)
    with pytest.raises(errors.FailedPrecondition, match="view"):
        store.resize("v", BIG)
    with pytest.raises(errors.NotFound):
        store.resize("missing", BIG)
    for bad in (0, -1, True, "2M", 1 << 60):
        with pytest.raises(errors.InvalidArgument):
            store.resize("b", bad)
    store.resize("b", SIZE)  # the same size: nothing to do
    assert {i.name: i.size for i in store.walk()} == {"img": SIZE, "v": SIZE, "b": SIZE}
    assert store.check().ok


def test_a_resize_that_fails_to_persist_changes_nothing(disk_store, monkeypatch):
    s = disk_store()
    s.prepare("a").pwrite(b"a", 0)

    def refuse(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(metadata, "resize_snapshot", refuse)
    with pytest.raises(KeyboardInterrupt):
        s.resize("a", BIG)
    assert s.stat("a").size == SIZE
    assert s.mounts("a").size == SIZE
    monkeypatch.undo()
    s.flush()
    s.close()
    s = disk_store()
    assert s.stat("a").size == SIZE and s.mounts("a").pread(1, 0) == b"a"
    s.resize("a", BIG)
    assert s.mounts("a").pread(1, BIG - 1) == b"\0"
    assert s.check().ok


def test_only_a_grown_child_raises_the_format_version(disk_store):
    def version() -> int:
        return s._meta.settings("test")["version"]

    s = disk_store()
    s.prepare("base").close()
    s.resize("base", BIG)
    assert version() == metadata.CREATED_VERSION
    s.commit("img", "base")
    s.prepare("child", "img")
    s.resize("child", BIG + CHUNK)
    assert version() == metadata.GROWN_VERSION
    s.close()
    assert disk_store().stat("child").size == BIG + CHUNK


def test_resize_through_the_cli(tmp_path, capsys):
    from cowstore import cli

    store = str(tmp_path / "s")
    assert cli.main(["--store", store, "init", "--chunk-size", "4K", "--default-size", "1M"]) == 0
    assert cli.main(["--store", store, "prepare", "a"]) == 0
    capsys.readouterr()
    assert cli.main(["--store", store, "--json", "resize", "a", "3M"]) == 0
    assert '"size": 3145728' in capsys.readouterr().out
    assert cli.main(["--store", store, "resize", "a", "1M"]) != 0
    assert "cannot shrink" in capsys.readouterr().err
    with cowstore.open(store) as s:
        assert s.stat("a").size == 3 << 20


def test_grown_stores_reopen_in_both_engines(engine, tmp_path):
    other = "python" if engine == "cython" else "cython"
    if other not in cowstore.engines.ENGINES:
        pytest.skip("one engine only")
    with cowstore.open(tmp_path / "s", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine) as s:
        s.prepare("b").pwrite(b"b", 0)
        s.commit("img", "b")
        s.prepare("c", "img")
        s.resize("c", BIG)
        s.mounts("c").pwrite(b"c", BIG - 1)
    with cowstore.open(tmp_path / "s", engine=other) as s:
        vol = s.mounts("c")
        assert (vol.pread(1, 0), vol.pread(1, BIG - 1)) == (b"b", b"c")
        vol.pwrite(b"d", SIZE + 1)
        assert os.path.exists(tmp_path / "s")
