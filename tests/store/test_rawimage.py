"""Raw image import and export are all or nothing: whatever stops them (an error, a full disk,
Ctrl-C, a crash) leaves neither a snapshot under the key nor a file under the output name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cowstore
from cowstore import errors, metadata, rawimage
from cowstore.store import IMPORTING
from tests.conftest import CHUNK
from tests.smallfs import fill, small_fs

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def image(path: Path, size: int, seed: int = 1) -> bytes:
    data = bytes((seed * 7 + i * 13) % 251 for i in range(size))
    path.write_bytes(data)
    return data


def leftovers(store: cowstore.Store) -> list[str]:
    return [i.name for i in store.walk() if i.name.startswith(IMPORTING)]


@pytest.fixture
def disk(engine, tmp_path):
    with cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, engine=engine) as s:
        yield s


class Stop(BaseException):
    """Stands for Ctrl-C: a BaseException from inside the import."""


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, Stop])
@pytest.mark.parametrize("where", ["copy", "final flush", "naming"])
def test_an_interrupted_import_leaves_nothing_and_the_same_import_then_succeeds(
    disk, tmp_path, monkeypatch, interrupt, where
):
    data = image(tmp_path / "img", 40 * CHUNK + 123)
    calls = {"n": 0}

    def progress(_: int) -> None:
        calls["n"] += 1
        if where == "copy" and calls["n"] == 5:
            raise interrupt()

    real_write, real_rename = metadata.write_changes, metadata.rename_snapshot

    def write_changes(db, pages, dead, directories):
        if where == "final flush" and pages:
            monkeypatch.setattr(metadata, "write_changes", real_write)
            raise interrupt()
        real_write(db, pages, dead, directories)

    def rename_snapshot(*args):
        monkeypatch.setattr(metadata, "rename_snapshot", real_rename)
        raise interrupt()

    monkeypatch.setattr(metadata, "write_changes", write_changes)
    if where == "naming":
        monkeypatch.setattr(metadata, "rename_snapshot", rename_snapshot)
    with pytest.raises(interrupt):
        rawimage.import_image(disk, tmp_path / "img", "k", progress=progress)
    assert not disk.exists("k") and leftovers(disk) == []
    monkeypatch.setattr(metadata, "write_changes", real_write)
    rawimage.import_image(disk, tmp_path / "img", "k")
    assert disk.mounts("k").pread(len(data), 0) == data
    assert disk.check(data=True).ok


def test_import_with_commit_names_the_committed_snapshot_only_when_complete(disk, tmp_path):
    data = image(tmp_path / "img", 10 * CHUNK)
    rawimage.import_image(disk, tmp_path / "img", "work", commit="layer", labels={"a": "b"})
    info = disk.stat("layer")
    assert (info.kind, info.labels) == (cowstore.Kind.COMMITTED, {"a": "b"})
    assert not disk.exists("work") and leftovers(disk) == []
    assert disk.reader("layer").pread(len(data), 0) == data


def test_import_refuses_a_commit_name_equal_to_the_key_before_creating_anything(disk, tmp_path):
    image(tmp_path / "img", CHUNK)
    with pytest.raises(errors.InvalidArgument, match="'k'"):
        rawimage.import_image(disk, tmp_path / "img", "k", commit="k")
    assert list(disk.walk()) == []


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: os.mkfifo(p), "a fifo"),
    ],
)
def test_import_of_something_that_is_not_an_image_names_the_path(disk, tmp_path, make, kind):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(errors.InvalidArgument) as info:
        rawimage.import_image(disk, path, "k")
    assert str(path) in str(info.value) and kind in str(info.value)
    assert list(disk.walk()) == []


def test_import_of_a_character_device_names_it(disk):
    with pytest.raises(errors.InvalidArgument, match="/dev/zero is a character device"):
        rawimage.import_image(disk, "/dev/zero", "k")


def test_an_import_left_by_a_crash_is_removed_at_the_next_open(engine, tmp_path):
    path = tmp_path / "store"
    with cowstore.open(path, create=True, chunk_size=CHUNK, engine=engine) as s:
        s.prepare(IMPORTING + "0123", size=8 * CHUNK).pwrite(b"half", 0)
        s.prepare("kept", size=8 * CHUNK)
    with cowstore.open(path, engine=engine) as s:
        assert [i.name for i in s.walk()] == ["kept"]
        assert s.check().ok


def test_a_killed_import_leaves_no_snapshot_under_its_key(engine, tmp_path):
    image(tmp_path / "img", 64 * MiB // 8)
    path = tmp_path / "store"
    cowstore.open(path, create=True, chunk_size=CHUNK, engine=engine).close()
    script = (
        "import sys, cowstore\n"
        "from cowstore import rawimage\n"
        f"s = cowstore.open({str(path)!r}, engine={engine!r})\n"
        "def progress(n):\n"
        "    print('copying', flush=True)\n"
        f"rawimage.import_image(s, {str(tmp_path / 'img')!r}, 'k', progress=progress)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    with cowstore.open(path, engine=engine) as s:
        assert list(s.walk()) == []
        assert s.check().ok


def test_an_import_that_fills_the_disk_names_the_image_and_leaves_nothing(engine, tmp_path):
    with small_fs(tmp_path) as fs:
        data = image(tmp_path / "img", 16 * MiB)
        with cowstore.open(fs / "store", create=True, chunk_size=64 << 10, engine=engine) as s:
            filler = fill(fs, leave=4 * MiB)
            with pytest.raises(errors.NoSpace) as info:
                rawimage.import_image(s, tmp_path / "img", "k")
            assert str(tmp_path / "img") in str(info.value)
            assert list(s.walk()) == []
            os.unlink(filler)
            rawimage.import_image(s, tmp_path / "img", "k")
            assert s.mounts("k").pread(len(data), 0) == data
            assert s.check(data=True).ok


def test_export_refuses_an_existing_file_unless_asked_to_replace_it(disk, tmp_path):
    disk.prepare("a", size=4 * CHUNK).pwrite(b"new", 0)
    out = tmp_path / "out.raw"
    out.write_bytes(b"old")
    with pytest.raises(errors.AlreadyExists, match="--force"):
        rawimage.export_volume(disk.reader("a"), out, CHUNK)
    assert out.read_bytes() == b"old"
    rawimage.export_volume(disk.reader("a"), out, CHUNK, replace=True)
    assert out.read_bytes()[:3] == b"new" and out.stat().st_size == 4 * CHUNK


def test_an_interrupted_export_leaves_no_file_under_the_final_name(disk, tmp_path):
    disk.prepare("a", size=64 * CHUNK).pwrite(os.urandom(64 * CHUNK), 0)
    out = tmp_path / "out.raw"

    def progress(_: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rawimage.export_volume(disk.reader("a"), out, CHUNK, progress=progress)
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]


def test_export_to_standard_output_writes_every_byte_in_order(engine, tmp_path):
    data = os.urandom(6 * CHUNK)
    with cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, engine=engine) as s:
        s.prepare("a", size=16 * CHUNK).pwrite(data, 3 * CHUNK)
    script = (
        "import cowstore\n"
        "from cowstore import rawimage\n"
        f"with cowstore.open({str(tmp_path / 'store')!r}, engine={engine!r}) as s:\n"
        f"    rawimage.export_volume(s.reader('a'), '-', {CHUNK})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, check=True)
    assert done.stdout == bytes(3 * CHUNK) + data + bytes(7 * CHUNK)
