"""A mounted store as programs see it: every snapshot a file, tested with system calls and
tools. Names, attributes, bytes, errors, durability, the directory changing under the mount,
concurrency, and the mount's life.

`mounted` (tests/fuse/conftest.py) runs each test once per engine, and so against both
servers: the Cython one over libfuse and the pure-Python one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cowstore
from cowstore import fuse
from cowstore.fallocate import preallocate
from cowstore.fuse import kernel
from tests.data import pattern
from tests.tools import TIMEOUT, need, run

from .conftest import BASE, CHUNK, KEYS, SIZE, Mounted

MIB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), raising OSError with its errno."""
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_file(m: Mounted, key: str, data: bytes, offset: int) -> int:
    fd = os.open(m.path(key), os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_file(m: Mounted, key: str, length: int, offset: int) -> bytes:
    fd = os.open(m.path(key), os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# -- names and attributes ------------------------------------------------------------------


def test_every_snapshot_is_a_file_named_by_its_quoted_key(mounted: Mounted) -> None:
    names = os.listdir(mounted.mountpoint)
    assert sorted(names) == sorted(fuse.file_name(k) for k in KEYS)
    assert "default%2F1%2Fsha256%3Abase" in names
    assert "rw%20layer" in names
    assert all(fuse.snapshot_key(n) in KEYS for n in names)
    for missing in ("default/1/sha256:base", "nothing", "rw layer"):
        assert not os.path.exists(mounted.mountpoint / missing)
    mounted.store.prepare("a/b c:d").close()
    mounted.store.commit("committed x:y", "a/b c:d")
    assert os.path.exists(mounted.mountpoint / "committed%20x%3Ay")
    assert not os.path.exists(mounted.path("a/b c:d")), "an active snapshot's file outlived its commit"


def test_names_that_are_no_snapshot_s_file_do_not_exist(mounted: Mounted) -> None:
    """Only the canonical quoting of a key names its file: another spelling of the same key,
    a name that is not UTF-8 or a path below a file is ENOENT or ENOTDIR, never that file."""
    root = os.fsencode(mounted.mountpoint)
    for name in (b"default%2f1%2fsha256%3abase", b"rw+layer", b"rw%20layer%", b"\xff\xfe", b"." * 3):
        with pytest.raises(FileNotFoundError):
            os.open(root + b"/" + name, os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        os.stat(os.path.join(mounted.path(KEYS[1]), "below"))


def test_sizes_modes_and_blocks_follow_the_snapshot(mounted: Mounted) -> None:
    base, active, view = KEYS
    root = os.stat(mounted.mountpoint)
    assert stat.S_ISDIR(root.st_mode)
    assert stat.S_IMODE(root.st_mode) == 0o555
    for key in KEYS:
        st = os.stat(mounted.path(key))
        assert stat.S_ISREG(st.st_mode)
        assert st.st_size == SIZE
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE(os.stat(mounted.path(active)).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(mounted.path(base)).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(mounted.path(view)).st_mode) == 0o444
    assert os.stat(mounted.path(base)).st_blocks * 512 == 3 * CHUNK

    mounted.store.prepare("empty", size=3 * MIB).close()
    assert os.stat(mounted.path("empty")).st_size == 3 * MIB
    assert os.stat(mounted.path("empty")).st_blocks == 0
    fd = os.open(mounted.path("empty"), os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 5 * CHUNK + 7)
        os.pwrite(fd, b"y" * (2 * CHUNK), 8 * CHUNK)
        assert os.fstat(fd).st_blocks * 512 == 3 * CHUNK
        assert os.stat(mounted.path("empty")).st_blocks * 512 == 3 * CHUNK
    finally:
        os.close(fd)


def test_statfs_counts_chunks_of_the_pool(mounted: Mounted) -> None:
    st = os.statvfs(mounted.mountpoint)
    assert st.f_bsize == CHUNK
    assert st.f_blocks >= st.f_bfree > 0
    assert st.f_namemax == 255


def test_files_have_no_extended_attributes(mounted: Mounted) -> None:
    """None to read (ENODATA, an empty list: what `cp -a` and `ls` expect of a file system
    without them, rather than EOPNOTSUPP) and none to set or remove."""
    for path in (mounted.mountpoint, mounted.path(KEYS[0]), mounted.path(KEYS[1])):
        assert os.listxattr(path) == []
        for name in ("user.x", "security.capability", "system.posix_acl_access"):
            with pytest.raises(OSError) as exc:
                os.getxattr(path, name)
            assert exc.value.errno == errno.ENODATA, (path, name)
    for call in (
        lambda: os.setxattr(mounted.path(KEYS[1]), "user.x", b"1"),
        lambda: os.removexattr(mounted.path(KEYS[1]), "user.x"),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EPERM


# -- reads and writes ----------------------------------------------------------------------


def test_reads_match_the_volume(mounted: Mounted) -> None:
    for key in KEYS:
        with open(mounted.path(key), "rb") as f:
            data = f.read()
        with mounted.store.reader(key) as v:
            assert len(data) == SIZE
            assert data[: 4 * CHUNK] == v.pread(4 * CHUNK, 0)
            assert data[: 3 * CHUNK] == BASE
            assert data[3 * CHUNK :] == bytes(SIZE - 3 * CHUNK)


def test_writes_are_byte_exact(mounted: Mounted) -> None:
    """Random writes of every awkward size land exactly; the store's own writes show
    through the file, and the parent is untouched."""
    active = KEYS[1]
    rng = random.Random(7)
    expect = bytearray(BASE + bytes(SIZE - 3 * CHUNK))
    fd = os.open(mounted.path(active), os.O_RDWR)
    try:
        for i in range(60):
            offset = rng.randrange(SIZE - 1)
            n = min(rng.choice([1, 511, 4096, 4097, CHUNK + 3, 300_000]), SIZE - offset)
            data = pattern(n, 100 + i)
            assert os.pwrite(fd, data, offset) == n
            expect[offset : offset + n] = data
            if i % 10 == 0:
                assert os.pread(fd, n, offset) == data
    finally:
        os.close(fd)
    with mounted.store.mounts(active) as v:
        for offset in range(0, SIZE, MIB):
            assert v.pread(MIB, offset) == expect[offset : offset + MIB]
        v.pwrite(b"from the store", 12345)
    assert read_file(mounted, active, 14, 12345) == b"from the store"
    with mounted.store.reader(KEYS[0]) as v:
        assert v.pread(3 * CHUNK, 0) == BASE


def test_writes_to_a_child_leave_its_parent_file_alone(mounted: Mounted) -> None:
    """The parent's file keeps its page cache across opens: a child's writes must not
    show in it, and a new child reads the parent's bytes."""
    base, active, _ = KEYS
    assert read_file(mounted, base, 3 * CHUNK, 0) == BASE
    assert write_file(mounted, active, b"x" * 10, 5000) == 10
    assert read_file(mounted, active, 12, 5000) == b"x" * 10 + BASE[5010:5012]
    assert read_file(mounted, base, 3 * CHUNK, 0) == BASE
    mounted.store.prepare("second child", base).close()
    assert read_file(mounted, "second child", 3 * CHUNK, 0) == BASE


def test_one_mib_in_one_call(mounted: Mounted) -> None:
    data = pattern(MIB, 3)
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 3 * MIB) == MIB
        assert os.pread(fd, MIB, 3 * MIB) == data
        assert os.pread(fd, MIB, 3 * MIB + 17) == data[17:] + bytes(17)
    finally:
        os.close(fd)
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(MIB, 3 * MIB) == data


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_aligned_io_with_and_without_the_page_cache(mounted: Mounted, direct: bool) -> None:
    buf = mmap.mmap(-1, MIB)
    buf.write(pattern(MIB, 4))
    back = mmap.mmap(-1, MIB)
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR | (os.O_DIRECT if direct else 0))
    try:
        assert os.pwritev(fd, [buf], 2 * MIB) == MIB
        assert os.preadv(fd, [back], 2 * MIB) == MIB
        assert back[:] == buf[:]
    finally:
        os.close(fd)
    fd = os.open(mounted.path(KEYS[0]), os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        assert os.preadv(fd, [back], 0) == MIB
        assert back[: 3 * CHUNK] == BASE
    finally:
        os.close(fd)


def test_the_end_of_a_file(mounted: Mounted) -> None:
    """A file cannot grow: reads stop at its end, a write across it is short, one from it
    or past it is ENOSPC (a full device)."""
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR)
    try:
        assert os.pread(fd, 100, SIZE - 10) == bytes(10)
        assert os.pread(fd, 100, SIZE) == b""
        assert os.pread(fd, 100, SIZE + 12345) == b""
        assert os.pwrite(fd, b"z" * 8192, SIZE - 4096) == 4096
        for offset in (SIZE, SIZE + 4096, SIZE + MIB):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"z", offset)
            assert exc.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(4096, SIZE - 4096) == b"z" * 4096


def test_read_only_files_refuse_writes(mounted: Mounted) -> None:
    base, _, view = KEYS
    for key in (base, view):
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as exc:
                os.open(mounted.path(key), flags)
            assert exc.value.errno in (errno.EROFS, errno.EACCES)
        fd = os.open(mounted.path(key), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"no", 0)
            assert exc.value.errno == errno.EBADF
            with pytest.raises(OSError) as exc:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, CHUNK)
            assert exc.value.errno in (errno.EBADF, errno.EROFS)
            assert os.pread(fd, 3 * CHUNK, 0) == BASE
        finally:
            os.close(fd)
    with mounted.store.reader(base) as v:
        assert v.pread(3 * CHUNK, 0) == BASE


def test_a_file_of_a_committed_snapshot_stops_reading_and_writing(mounted: Mounted) -> None:
    """A commit makes a new file; one still open on the active snapshot neither writes into
    the committed one nor reads from it."""
    _, active, _ = KEYS
    fd = os.open(mounted.path(active), os.O_RDWR)
    try:
        os.pwrite(fd, b"before", 0)
        mounted.store.commit("committed", active)
        for offset in (0, 5 * CHUNK):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"after", offset)
            assert exc.value.errno in (errno.ESTALE, errno.EIO)
        with pytest.raises(OSError) as exc:
            os.pread(fd, 6, CHUNK)
        assert exc.value.errno in (errno.ESTALE, errno.EIO)
    finally:
        os.close(fd)
    with mounted.store.reader("committed") as v:
        assert v.pread(6, 0) == b"before"
        assert v.pread(5, 5 * CHUNK) == bytes(5)
    names = os.listdir(mounted.mountpoint)
    assert fuse.file_name("committed") in names
    assert fuse.file_name(active) not in names
    assert read_file(mounted, "committed", 6, 0) == b"before"


def test_a_file_of_a_removed_snapshot_reads_nothing_of_another(mounted: Mounted) -> None:
    """The chunks of a removed snapshot go to the next writer: a file still open on it
    fails rather than show that writer's bytes."""
    _, active, _ = KEYS
    write_file(mounted, active, b"mine", 0)
    fd = os.open(mounted.path(active), os.O_RDWR | os.O_DIRECT)
    try:
        mounted.store.remove(active)
        mounted.store.prepare("other").close()
        with mounted.store.mounts("other") as v:
            v.pwrite(b"theirs", 0)
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)
        assert exc.value.errno in (errno.ESTALE, errno.EIO)
    finally:
        os.close(fd)


def test_fsync_makes_writes_durable(mounted: Mounted, tmp_path: Path) -> None:
    """A copy of the store's files taken right after fsync (what a power cut would leave)
    holds the write; so does the store reopened after unmounting."""
    data = pattern(3 * CHUNK + 100, 5)
    with open(mounted.path(KEYS[1]), "r+b", buffering=0) as f:
        f.seek(7 * CHUNK)
        f.write(data)
        os.fsync(f.fileno())
        shutil.copytree(mounted.directory, tmp_path / "copy")
    copy = cowstore.open(tmp_path / "copy", engine=mounted.engine)
    try:
        with copy.mounts(KEYS[1]) as v:
            assert v.pread(len(data), 7 * CHUNK) == data
    finally:
        copy.close()
    mounted.remount()
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(len(data), 7 * CHUNK) == data
    assert read_file(mounted, KEYS[1], len(data), 7 * CHUNK) == data


def test_seek_data_and_hole(mounted: Mounted) -> None:
    mounted.store.prepare("sparse").close()
    fd = os.open(mounted.path("sparse"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        os.pwrite(fd, b"d" * CHUNK, 4 * CHUNK)
        os.pwrite(fd, b"d" * 10, 9 * CHUNK + 100)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 4 * CHUNK
        assert os.lseek(fd, 4 * CHUNK + 5, os.SEEK_DATA) == 4 * CHUNK + 5
        assert os.lseek(fd, 4 * CHUNK, os.SEEK_HOLE) == 5 * CHUNK
        assert os.lseek(fd, 5 * CHUNK, os.SEEK_DATA) == 9 * CHUNK
        assert os.lseek(fd, 9 * CHUNK, os.SEEK_HOLE) == 10 * CHUNK
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 10 * CHUNK, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
        with pytest.raises(OSError) as exc:
            os.lseek(fd, SIZE, os.SEEK_HOLE)
        assert exc.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_END) == SIZE
    finally:
        os.close(fd)


def test_punch_hole_gives_space_back(mounted: Mounted) -> None:
    mounted.store.prepare("punched").close()
    path = mounted.path("punched")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, pattern(6 * CHUNK, 9), 0)
        assert mounted.store.usage("punched").size == 6 * CHUNK
        assert os.fstat(fd).st_blocks * 512 == 6 * CHUNK
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CHUNK, 3 * CHUNK)
        assert mounted.store.usage("punched").size == 3 * CHUNK
        assert os.stat(path).st_blocks * 512 == 3 * CHUNK
        assert os.pread(fd, 3 * CHUNK, CHUNK) == bytes(3 * CHUNK)
        assert os.pread(fd, CHUNK, 0) == pattern(CHUNK, 9)
        assert os.pread(fd, 2 * CHUNK, 4 * CHUNK) == pattern(6 * CHUNK, 9)[4 * CHUNK :]
    finally:
        os.close(fd)


def test_fallocate_cannot_grow_or_reserve(mounted: Mounted) -> None:
    """A snapshot cannot promise space: reserving (mode 0, KEEP_SIZE alone) is EOPNOTSUPP,
    which `preallocate` takes as "not supported"; the size never changes."""
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR)
    try:
        for mode in (0, FALLOC_FL_KEEP_SIZE):
            with pytest.raises(OSError) as exc:
                fallocate(fd, mode, 0, CHUNK)
            assert exc.value.errno == errno.EOPNOTSUPP
        assert not preallocate(fd, SIZE - CHUNK, 2 * CHUNK)
    finally:
        os.close(fd)
    assert os.stat(mounted.path(KEYS[1])).st_size == SIZE


def test_mmap_in_another_process(mounted: Mounted) -> None:
    """Shared mappings of both kinds of file work (an active snapshot's file is direct I/O,
    which the kernel maps only when the server allows it). Another process maps them: a
    page fault in the server's own process would wait for a server that cannot run."""
    program = f"""
import mmap, os
fd = os.open({str(mounted.path(KEYS[1]))!r}, os.O_RDWR)
with mmap.mmap(fd, 4 * {CHUNK}) as m:
    assert m[: 3 * {CHUNK}] == open({str(mounted.path(KEYS[0]))!r}, "rb").read(3 * {CHUNK})
    m[100:105] = b"world"
    m.flush()
os.close(fd)
fd = os.open({str(mounted.path(KEYS[0]))!r}, os.O_RDONLY)
with mmap.mmap(fd, {SIZE}, prot=mmap.PROT_READ) as m:
    print(m[{SIZE} - 5 :].hex(), m[5:10].hex())
os.close(fd)
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [bytes(5).hex(), BASE[5:10].hex()]
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(5, 100) == b"world"


# -- the directory -------------------------------------------------------------------------


def test_directory_changes_are_refused(mounted: Mounted) -> None:
    """Snapshots change through the store only: every change to the directory or to a
    file's size, mode or owner is EPERM; changes to what the file already has are not."""
    base, active, _ = KEYS
    mp = mounted.mountpoint
    calls = {
        "create": lambda: os.open(mp / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "mknod": lambda: os.mknod(mp / "node", stat.S_IFREG | 0o644),
        "mkdir": lambda: os.mkdir(mp / "dir"),
        "unlink": lambda: os.unlink(mounted.path(active)),
        "rename": lambda: os.rename(mounted.path(active), mp / "renamed"),
        "rename over": lambda: os.rename(mounted.path(active), mounted.path(base)),
        "link": lambda: os.link(mounted.path(active), mp / "hard"),
        "symlink": lambda: os.symlink("target", mp / "sym"),
        "truncate": lambda: os.truncate(mounted.path(active), SIZE // 2),
        "O_TRUNC": lambda: os.open(mounted.path(active), os.O_RDWR | os.O_TRUNC),
        "chmod": lambda: os.chmod(mounted.path(active), 0o600),
        "chmod read-only": lambda: os.chmod(mounted.path(base), 0o644),
        "chown": lambda: os.chown(mounted.path(active), 12345, 12345),
        "chgrp": lambda: os.chown(mounted.path(active), -1, os.getegid() + 1),
    }
    for what, call in calls.items():
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EPERM, what
    with pytest.raises(OSError) as exc:
        os.open(mp, os.O_TMPFILE | os.O_RDWR)
    assert exc.value.errno == errno.EOPNOTSUPP, "O_TMPFILE (a program falls back to creating a file)"
    with pytest.raises(NotADirectoryError):
        os.rmdir(mounted.path(active))
    assert sorted(os.listdir(mp)) == sorted(fuse.file_name(k) for k in KEYS)
    os.truncate(mounted.path(active), SIZE)
    os.utime(mounted.path(active))
    os.chmod(mounted.path(active), 0o644)
    os.chmod(mounted.path(base), 0o444)
    os.chown(mounted.path(active), os.geteuid(), os.getegid())
    assert stat.S_IMODE(os.stat(mounted.path(active)).st_mode) == 0o644


def test_snapshots_come_and_go(mounted: Mounted) -> None:
    name = fuse.file_name("later/one")
    assert name not in os.listdir(mounted.mountpoint)
    assert not os.path.exists(mounted.path("later/one"))
    mounted.store.prepare("later/one", size=3 * CHUNK).close()
    assert name in os.listdir(mounted.mountpoint)
    assert os.stat(mounted.path("later/one")).st_size == 3 * CHUNK
    mounted.store.remove("later/one")
    assert name not in os.listdir(mounted.mountpoint)
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path("later/one"))
    mounted.store.remove(KEYS[2])
    assert sorted(os.listdir(mounted.mountpoint)) == sorted(fuse.file_name(k) for k in KEYS[:2])


def test_a_big_directory_reads_whole(mounted: Mounted) -> None:
    """300 long names take many READDIR replies; each entry comes once, with its attributes."""
    keys = [f"many/{i:04d}: {'x' * 60}" for i in range(300)]
    for key in keys:
        mounted.store.prepare(key, size=CHUNK).close()
    names = os.listdir(mounted.mountpoint)
    assert len(names) == len(set(names))
    assert set(names) == {fuse.file_name(k) for k in (*KEYS, *keys)}
    with os.scandir(mounted.mountpoint) as entries:
        sizes = {e.name: e.stat().st_size for e in entries}
    assert sizes[fuse.file_name(keys[-1])] == CHUNK
    assert sizes[fuse.file_name(KEYS[0])] == SIZE


# -- concurrency ---------------------------------------------------------------------------


def test_threads_and_processes_at_once(mounted: Mounted, run_concurrently) -> None:
    """Threads write two files and read a third while `dd` processes write the same two."""
    need("dd")
    base, active, _ = KEYS
    mounted.store.prepare("second").close()

    def writer(key: str, seed: int, start: int) -> None:
        fd = os.open(mounted.path(key), os.O_RDWR)
        try:
            for i in range(16):
                data = pattern(CHUNK + 1000, seed + i)
                offset = start + i * 2 * CHUNK
                assert os.pwrite(fd, data, offset) == len(data)
                assert os.pread(fd, len(data), offset) == data
        finally:
            os.close(fd)

    def reader() -> None:
        with open(mounted.path(base), "rb") as f:
            for _ in range(20):
                f.seek(0)
                assert f.read(3 * CHUNK) == BASE

    source = mounted.directory.parent / "dd-source"
    source.write_bytes(pattern(2 * MIB, 77))
    procs = [
        subprocess.Popen(
            ["dd", f"if={source}", f"of={mounted.path(key)}", "bs=1M", "seek=12", "conv=notrunc,fsync"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key in (active, "second")
    ]
    try:
        run_concurrently(
            lambda: writer(active, 1000, 0),
            lambda: writer(active, 2000, 4 * MIB),
            lambda: writer("second", 3000, 0),
            reader,
            reader,
        )
    finally:
        outcomes = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outcomes, strict=True):
        assert p.returncode == 0, err
    for key, seeds in ((active, ((1000, 0), (2000, 4 * MIB))), ("second", ((3000, 0),))):
        with mounted.store.mounts(key) as v:
            for seed, start in seeds:
                for i in range(16):
                    data = pattern(CHUNK + 1000, seed + i)
                    assert v.pread(len(data), start + i * 2 * CHUNK) == data
            assert v.pread(2 * MIB, 12 * MIB) == pattern(2 * MIB, 77)


# -- the mount's life ----------------------------------------------------------------------


def test_unmount_from_outside_ends_the_mount(mounted: Mounted) -> None:
    assert mounted.mount.running
    run("fusermount3", "-u", str(mounted.mountpoint))
    assert mounted.mount.wait(10)
    assert not mounted.mount.running
    assert not kernel.is_mounted(str(mounted.mountpoint))


def test_close_with_a_file_still_open(mounted: Mounted) -> None:
    """`close` unmounts lazily and ends the connection; the open file then fails."""
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"z", 0) == 1
        started = time.monotonic()
        mounted.mount.close()
        assert time.monotonic() - started < 30
        assert not mounted.mount.running
        assert not kernel.is_mounted(str(mounted.mountpoint))
        with pytest.raises(OSError):
            os.pwrite(fd, b"z", 0)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the file is closed all the same
            os.close(fd)
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(1, 0) == b"z"


def test_a_bug_in_the_namespace_answers_eio_and_is_logged(
    mounted: Mounted, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(mounted.mount.namespace, "statfs", broken)
    with caplog.at_level(logging.ERROR, logger="cowstore.fuse"), pytest.raises(OSError) as exc:
        os.statvfs(mounted.mountpoint)
    assert exc.value.errno == errno.EIO
    bugs = [r for r in caplog.records if r.name == "cowstore.fuse" and r.exc_info]
    assert len(bugs) == 1
    exc_info = bugs[0].exc_info
    assert exc_info is not None and isinstance(exc_info[1], TypeError)


_EXIT_WITHOUT_CLOSE = """
import os, subprocess, sys
import cowstore, cowstore.fuse
store = cowstore.open(sys.argv[1], engine=sys.argv[3])
mount = cowstore.fuse.mount(store, sys.argv[2])
path = os.path.join(sys.argv[2], cowstore.fuse.file_name(sys.argv[4]))
fd = os.open(path, os.O_RDWR)
os.pwrite(fd, b"left open", 0)
holder = subprocess.Popen(
    ["sleep", "600"], stdin=os.open(path, os.O_RDONLY), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
)
print(holder.pid, flush=True)
"""


def test_a_process_that_exits_without_closing_leaves_no_mount(mounted: Mounted) -> None:
    """A mount still open when its process exits (files open in it, and in a process that
    outlives it) is closed at exit: the process ends at once and leaves no mount behind."""
    need("sleep")
    _, active, _ = KEYS
    mounted.mount.close()
    mounted.store.close()
    child = mounted.mountpoint.parent / "child-mnt"
    child.mkdir()
    argv = [str(mounted.directory), str(child), mounted.engine, active]
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    holder = int(line) if line.strip() else None
    try:
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            conn = kernel.connection(str(child))
            if conn is not None:
                kernel.abort(conn)  # what lets the hung process end
            _, err = proc.communicate(timeout=TIMEOUT)
            err = f"the process hung at exit\n{err}"
        assert proc.returncode == 0 and "hung" not in err, err
        assert "Traceback" not in err and "Fatal" not in err, err
        assert not kernel.is_mounted(str(child))
    finally:
        if holder is not None:
            os.kill(holder, signal.SIGKILL)
        if kernel.is_mounted(str(child)):
            kernel.detach(str(child), lazy=True)
    mounted.store = cowstore.open(mounted.directory, engine=mounted.engine)
    with mounted.store.mounts(active) as v:
        assert v.pread(9, 0) == b"left open"
    mounted.mount = fuse.mount(mounted.store, str(mounted.mountpoint))
