"""The FUSE mount as programs see it: names, sizes, bytes, errors, durability, concurrency.

Written against `mounted` (tests/fuse/conftest.py), so the same checks hold for any server.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import subprocess
import sys
import time

import pytest

import cowstore
import cowstore.fuse
from cowstore.fallocate import punch_hole

from .conftest import CHUNK, SIZE, Mounted

MiB = 1 << 20


def _write(m: Mounted, key: str, data: bytes, offset: int, *, sync: bool = False) -> int:
    fd = os.open(m.path(key), os.O_WRONLY)
    try:
        n = os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
        return n
    finally:
        os.close(fd)


def _read(m: Mounted, key: str, length: int, offset: int) -> bytes:
    fd = os.open(m.path(key), os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_every_snapshot_is_a_file_named_by_its_quoted_key(mounted: Mounted) -> None:
    s = mounted.store
    s.prepare("a/b c:d")
    s.commit("base/1 x:y", "a/b c:d")
    s.view("view one", "base/1 x:y")
    s.prepare("child:2", "base/1 x:y")
    names = set(os.listdir(mounted.mountpoint))
    assert names == {cowstore.fuse.file_name(k) for k in ("rw", "base/1 x:y", "view one", "child:2")}
    assert "base%2F1%20x%3Ay" in names
    for key in ("rw", "base/1 x:y", "view one", "child:2"):
        assert os.stat(mounted.path(key)).st_size == SIZE
    assert not os.path.exists(mounted.mountpoint / "a%2Fb%20c%3Ad")
    assert not os.path.exists(mounted.mountpoint / "base/1 x:y")


def test_modes_follow_the_kind(mounted: Mounted) -> None:
    s = mounted.store
    s.commit("c", "rw")
    s.view("v", "c")
    s.prepare("a", "c")
    assert os.stat(mounted.path("a")).st_mode & 0o777 == 0o644
    assert os.stat(mounted.path("c")).st_mode & 0o777 == 0o444
    assert os.stat(mounted.path("v")).st_mode & 0o777 == 0o444
    assert os.stat(mounted.mountpoint).st_mode & 0o777 == 0o555


def test_snapshots_appear_and_go_at_once(mounted: Mounted) -> None:
    assert not os.path.exists(mounted.path("late"))
    mounted.store.prepare("late", size=3 * CHUNK)
    assert os.stat(mounted.path("late")).st_size == 3 * CHUNK
    mounted.store.remove("late")
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path("late"))


def test_reads_and_writes_match_the_volume_byte_for_byte(mounted: Mounted) -> None:
    rng = random.Random(7)
    model = bytearray(SIZE)
    volume = mounted.store.mounts("rw")
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        for _ in range(200):
            offset = rng.randrange(SIZE)
            data = rng.randbytes(rng.randrange(1, min(3 * CHUNK, SIZE - offset) + 1))
            assert os.pwrite(fd, data, offset) == len(data)
            model[offset : offset + len(data)] = data
        for _ in range(100):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, 3 * CHUNK)
            got = os.pread(fd, length, offset)
            assert got == bytes(model[offset : offset + length])
            assert got == volume.pread(min(length, SIZE - offset), offset)
    finally:
        os.close(fd)
        volume.close()
    with mounted.store.mounts("rw") as v:
        assert v.pread(SIZE, 0) == bytes(model)


def test_a_child_reads_its_parent_through_the_file(mounted: Mounted) -> None:
    data = random.Random(1).randbytes(CHUNK + 123)
    assert _write(mounted, "rw", data, 5000) == len(data)
    mounted.store.commit("base", "rw")
    mounted.store.prepare("kid", "base")
    assert _read(mounted, "base", len(data), 5000) == data
    assert _read(mounted, "kid", len(data), 5000) == data
    assert _write(mounted, "kid", b"x" * 10, 5000) == 10
    assert _read(mounted, "kid", 12, 5000) == b"x" * 10 + data[10:12]
    assert _read(mounted, "base", 12, 5000) == data[:12]


def test_one_mebibyte_in_one_call(mounted: Mounted) -> None:
    data = random.Random(2).randbytes(MiB)
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 3 * MiB + 512) == MiB
        assert os.pread(fd, MiB, 3 * MiB + 512) == data
    finally:
        os.close(fd)
    with mounted.store.mounts("rw") as v:
        assert v.pread(MiB, 3 * MiB + 512) == data


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_aligned_io_with_and_without_the_page_cache(mounted: Mounted, direct: bool) -> None:
    import mmap

    buf = mmap.mmap(-1, MiB)
    buf.write(random.Random(3).randbytes(MiB))
    fd = os.open(mounted.path("rw"), os.O_RDWR | (os.O_DIRECT if direct else 0))
    try:
        assert os.pwritev(fd, [buf], 2 * MiB) == MiB
        back = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [back], 2 * MiB) == MiB
        assert back[:] == buf[:]
    finally:
        os.close(fd)


def test_the_end_of_a_file(mounted: Mounted) -> None:
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"abcdef", SIZE - 3) == 3
        assert os.pread(fd, 100, SIZE - 3) == b"abc"
        assert os.pread(fd, 100, SIZE) == b""
        assert os.pread(fd, 100, SIZE + 12345) == b""
        for offset in (SIZE, SIZE + 4096):
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", offset)
            assert info.value.errno in (errno.ENOSPC, errno.EFBIG)
    finally:
        os.close(fd)
    assert os.stat(mounted.path("rw")).st_size == SIZE


def test_read_only_files_refuse_writes(mounted: Mounted) -> None:
    s = mounted.store
    _write(mounted, "rw", b"keep", 0)
    s.commit("c", "rw")
    s.view("v", "c")
    for key in ("c", "v"):
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as info:
                os.open(mounted.path(key), flags)
            assert info.value.errno in (errno.EROFS, errno.EACCES)
        fd = os.open(mounted.path(key), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", 0)
            assert info.value.errno == errno.EBADF
            assert os.pread(fd, 4, 0) == b"keep"
        finally:
            os.close(fd)


def test_a_file_open_on_a_committed_snapshot_writes_nowhere(mounted: Mounted) -> None:
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"before", 0) == 6
        mounted.store.commit("done", "rw")
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"after!", 0)
        assert info.value.errno in (errno.ESTALE, errno.EIO)
        with pytest.raises(OSError) as info:
            os.pread(fd, 6, CHUNK)
        assert info.value.errno in (errno.ESTALE, errno.EIO)
    finally:
        os.close(fd)
    with mounted.store.reader("done") as v:
        assert v.pread(6, 0) == b"before"
    assert _read(mounted, "done", 6, 0) == b"before"
    assert not os.path.exists(mounted.path("rw"))


def test_a_removed_snapshot_reads_nothing_from_another(mounted: Mounted) -> None:
    _write(mounted, "rw", b"mine", 0)
    fd = os.open(mounted.path("rw"), os.O_RDWR | os.O_DIRECT)
    try:
        mounted.store.remove("rw")
        mounted.store.prepare("other")
        with mounted.store.mounts("other") as v:
            v.pwrite(b"theirs", 0)
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, 0)
        assert info.value.errno in (errno.ESTALE, errno.EIO)
    finally:
        os.close(fd)


def test_fsync_makes_writes_durable(mounted: Mounted) -> None:
    data = random.Random(4).randbytes(3 * CHUNK)
    assert _write(mounted, "rw", data, 7777, sync=True) == len(data)
    mounted.remount()
    with mounted.store.mounts("rw") as v:
        assert v.pread(len(data), 7777) == data
    assert _read(mounted, "rw", len(data), 7777) == data


def test_seek_data_and_hole(mounted: Mounted) -> None:
    _write(mounted, "rw", b"x" * 10, 3 * CHUNK + 5)
    fd = os.open(mounted.path("rw"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * CHUNK
        assert os.lseek(fd, 3 * CHUNK + 100, os.SEEK_DATA) == 3 * CHUNK + 100
        assert os.lseek(fd, 3 * CHUNK, os.SEEK_HOLE) == 4 * CHUNK
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        with pytest.raises(OSError) as info:
            os.lseek(fd, 4 * CHUNK, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_END) == SIZE
    finally:
        os.close(fd)


def test_punching_a_hole_gives_space_back(mounted: Mounted) -> None:
    _write(mounted, "rw", b"y" * (4 * CHUNK), 0)
    before = mounted.store.usage("rw").size
    blocks = os.stat(mounted.path("rw")).st_blocks
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        assert punch_hole(fd, CHUNK, 2 * CHUNK)
    finally:
        os.close(fd)
    assert mounted.store.usage("rw").size == before - 2 * CHUNK
    assert _read(mounted, "rw", 4 * CHUNK, 0) == b"y" * CHUNK + bytes(2 * CHUNK) + b"y" * CHUNK
    time.sleep(1.1)  # the attribute timeout
    assert os.stat(mounted.path("rw")).st_blocks < blocks


def test_fallocate_cannot_grow_or_reserve(mounted: Mounted) -> None:
    from cowstore.fallocate import FALLOC_FL_KEEP_SIZE, preallocate

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        for mode in (0, FALLOC_FL_KEEP_SIZE):
            assert libc.fallocate(fd, mode, 0, CHUNK) == -1
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        assert not preallocate(fd, SIZE - CHUNK, 2 * CHUNK)
    finally:
        os.close(fd)
    assert os.stat(mounted.path("rw")).st_size == SIZE


def test_the_directory_cannot_change(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    attempts = [
        lambda: os.mkdir(mp / "d"),
        lambda: os.open(mp / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        lambda: os.mknod(mp / "node"),
        lambda: os.unlink(mounted.path("rw")),
        lambda: os.rename(mounted.path("rw"), mp / "other"),
        lambda: os.link(mounted.path("rw"), mp / "other"),
        lambda: os.symlink("rw", mp / "other"),
        lambda: os.chmod(mounted.path("rw"), 0o600),
        lambda: os.truncate(mounted.path("rw"), 5),
        lambda: os.setxattr(mounted.path("rw"), "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP), attempt
    os.truncate(mounted.path("rw"), SIZE)
    assert set(os.listdir(mp)) == {"rw"}


def test_statfs(mounted: Mounted) -> None:
    st = os.statvfs(mounted.mountpoint)
    assert st.f_bsize == CHUNK
    assert st.f_blocks >= st.f_bfree > 0
    assert st.f_namemax == 255


def test_threads_read_and_write_at_once(mounted: Mounted, run_concurrently) -> None:
    pieces = 8
    span = SIZE // pieces
    rng = random.Random(5)
    blobs = [rng.randbytes(span) for _ in range(pieces)]

    def writer(i: int) -> None:
        fd = os.open(mounted.path("rw"), os.O_RDWR)
        try:
            for pos in range(0, span, 12345):
                part = blobs[i][pos : pos + 12345]
                assert os.pwrite(fd, part, i * span + pos) == len(part)
            assert os.pread(fd, span, i * span) == blobs[i]
        finally:
            os.close(fd)

    run_concurrently(*[lambda i=i: writer(i) for i in range(pieces)])
    with mounted.store.mounts("rw") as v:
        assert v.pread(SIZE, 0) == b"".join(blobs)


_CHILD = """
import os, random, sys
path, index, span = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(index).randbytes(span)
fd = os.open(path, os.O_RDWR)
for pos in range(0, span, 65536):
    assert os.pwrite(fd, data[pos : pos + 65536], index * span + pos) == len(data[pos : pos + 65536])
os.fsync(fd)
assert os.pread(fd, span, index * span) == data
os.close(fd)
"""


def test_processes_read_and_write_at_once(mounted: Mounted) -> None:
    pieces = 4
    span = SIZE // pieces
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(mounted.path("rw")), str(i), str(span)])
        for i in range(pieces)
    ]
    assert [c.wait(timeout=60) for c in children] == [0] * pieces
    expected = b"".join(random.Random(i).randbytes(span) for i in range(pieces))
    with mounted.store.mounts("rw") as v:
        assert v.pread(SIZE, 0) == expected


def test_an_unmount_from_outside_ends_the_server(mounted: Mounted) -> None:
    assert mounted.mount.running
    subprocess.run(["fusermount3", "-u", str(mounted.mountpoint)], check=True)
    assert mounted.mount.wait(10)
    mounted.mount.close()
    with open("/proc/self/mountinfo") as f:
        assert str(mounted.mountpoint) not in f.read()


def test_close_with_a_file_still_open(mounted: Mounted) -> None:
    fd = os.open(mounted.path("rw"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"z", 0) == 1
        mounted.mount.close()
        assert not mounted.mount.running
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_a_bug_in_the_namespace_answers_eio_and_is_reported(mounted: Mounted, monkeypatch) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: reported.append(args.exc_value))

    def broken() -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(mounted.mount.namespace, "statfs", broken)
    with pytest.raises(OSError) as info:
        os.statvfs(mounted.mountpoint)
    assert info.value.errno == errno.EIO
    assert len(reported) == 1
    assert isinstance(reported[0], TypeError)
