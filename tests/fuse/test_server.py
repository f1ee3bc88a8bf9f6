"""A mounted store through the kernel: every snapshot a file, tested with system calls and tools.

The `mounted` fixture is parametrised by the FUSE server's engine, so that both servers
(the pure-Python one and the Cython one) answer the same tests. Outside CI a missing tool
(fusermount3, mkfs.ext4, debugfs, dd) skips its test; in CI (`CI` set) it fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import cowstore
from cowstore import fuse
from cowstore.fuse import kernel

CHUNK = 65536
SIZE = 16 * 1024 * 1024
MIB = 1 << 20
TIMEOUT = 120
FUSE_ENGINES = ["python"]
"""The engines whose FUSE server is tested: the Cython one joins as "cython"."""

KEYS = ("default/1/sha256:base", "rw layer", "view: of base")
"""The fixture's snapshots: committed, active on it, and a view of it."""

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI (install fuse3 and e2fsprogs)")
        pytest.skip(f"{tool} is not installed")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([need(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode:
        raise AssertionError(f"{argv} failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fuse_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[2].startswith("fuse")]


@dataclass
class Mounted:
    """A store on disk, mounted; `path(key)` is a snapshot's file."""

    engine: str
    directory: Path
    mountpoint: Path
    store: cowstore.Store
    mount: fuse.Mount

    def path(self, key: str) -> str:
        return str(self.mountpoint / fuse.file_name(key))

    def open_store(self) -> cowstore.Store:
        return cowstore.open(self.directory, engine=self.engine)


@pytest.fixture(params=FUSE_ENGINES)
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mounted]:
    """A store with a committed base (data in its first chunks), an active layer on it and a
    view of it, mounted on a fresh directory; unmounted and closed at the end. A test that
    hangs on the mount has its connection aborted after `TIMEOUT` seconds, so it fails."""
    need("fusermount3")
    engine = request.param
    directory = tmp_path / "store"
    store = cowstore.open(directory, create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine)
    base, active, view = KEYS
    with store.prepare("base-tmp") as v:
        v.pwrite(pattern(1, 3 * CHUNK), 0)
    store.commit(base, "base-tmp")
    store.prepare(active, base).close()
    store.view(view, base).close()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = Mounted(engine, directory, mountpoint, store, fuse.mount(store, str(mountpoint)))
    conn = kernel.connection(str(mountpoint))
    watchdog = threading.Timer(TIMEOUT, lambda: conn is not None and kernel.abort(conn))
    watchdog.start()
    try:
        yield m
    finally:
        watchdog.cancel()
        try:
            m.mount.close()
        finally:
            m.store.close()
        assert not any(str(mountpoint) in line for line in fuse_mounts())


# -- names and attributes ------------------------------------------------------


def test_files_are_the_snapshots_quoted(mounted: Mounted) -> None:
    names = os.listdir(mounted.mountpoint)
    assert sorted(names) == sorted(fuse.file_name(k) for k in KEYS)
    assert "default%2F1%2Fsha256%3Abase" in names
    assert "rw%20layer" in names
    assert all(fuse.snapshot_key(n) in KEYS for n in names)
    for missing in ("default/1/sha256:base", "nothing", "rw layer"):
        assert not os.path.exists(mounted.mountpoint / missing)


def test_sizes_modes_and_blocks(mounted: Mounted) -> None:
    base, active, view = KEYS
    for key in KEYS:
        st = os.stat(mounted.path(key))
        assert stat.S_ISREG(st.st_mode)
        assert st.st_size == SIZE
    assert stat.S_IMODE(os.stat(mounted.path(active)).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(mounted.path(base)).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(mounted.path(view)).st_mode) == 0o444
    assert os.stat(mounted.path(base)).st_blocks * 512 == 3 * CHUNK

    mounted.store.prepare("empty").close()
    assert os.stat(mounted.path("empty")).st_blocks == 0
    fd = os.open(mounted.path("empty"), os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 5 * CHUNK + 7)
        os.pwrite(fd, b"y" * (2 * CHUNK), 8 * CHUNK)
        assert os.fstat(fd).st_blocks * 512 == 3 * CHUNK
        assert os.stat(mounted.path("empty")).st_blocks * 512 == 3 * CHUNK
    finally:
        os.close(fd)


def test_statfs(mounted: Mounted) -> None:
    st = os.statvfs(mounted.mountpoint)
    assert st.f_bsize == CHUNK
    assert st.f_blocks >= st.f_bfree > 0
    assert st.f_namemax == 255


# -- reads and writes --------------------------------------------------------------


def test_reads_match_the_volume(mounted: Mounted) -> None:
    for key in KEYS:
        with open(mounted.path(key), "rb") as f:
            data = f.read()
        with mounted.store.reader(key) as v:
            assert len(data) == SIZE
            assert data[: 4 * CHUNK] == v.pread(4 * CHUNK, 0)
            assert data[: 3 * CHUNK] == pattern(1, 3 * CHUNK)
            assert data[3 * CHUNK :] == bytes(SIZE - 3 * CHUNK)


def test_writes_are_byte_exact(mounted: Mounted) -> None:
    active = KEYS[1]
    rng = random.Random(7)
    expect = bytearray(pattern(1, 3 * CHUNK) + bytes(SIZE - 3 * CHUNK))
    fd = os.open(mounted.path(active), os.O_RDWR)
    try:
        for i in range(60):
            offset = rng.randrange(SIZE - 1)
            n = min(rng.choice([1, 511, 4096, 4097, CHUNK + 3, 300_000]), SIZE - offset)
            data = pattern(100 + i, n)
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
    fd = os.open(mounted.path(active), os.O_RDONLY)
    try:
        assert os.pread(fd, 14, 12345) == b"from the store"
    finally:
        os.close(fd)
    with mounted.store.reader(KEYS[0]) as v:
        assert v.pread(3 * CHUNK, 0) == pattern(1, 3 * CHUNK)


def test_one_mib_in_one_call(mounted: Mounted) -> None:
    data = pattern(3, MIB)
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 3 * MIB) == MIB
        assert os.pread(fd, MIB, 3 * MIB) == data
        assert os.pread(fd, MIB, 3 * MIB + 17) == data[17:] + bytes(17)
    finally:
        os.close(fd)
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(MIB, 3 * MIB) == data


def test_the_end_of_a_file(mounted: Mounted) -> None:
    fd = os.open(mounted.path(KEYS[1]), os.O_RDWR)
    try:
        assert os.pread(fd, 100, SIZE - 10) == bytes(10)
        assert os.pread(fd, 100, SIZE) == b""
        assert os.pwrite(fd, b"z" * 8192, SIZE - 4096) == 4096
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"z", SIZE)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"z", SIZE + MIB)
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
        finally:
            os.close(fd)
    with mounted.store.reader(base) as v:
        assert v.pread(3 * CHUNK, 0) == pattern(1, 3 * CHUNK)


def test_directory_changes_are_refused(mounted: Mounted) -> None:
    base, active, _ = KEYS
    mp = mounted.mountpoint
    calls = {
        "create": lambda: os.open(mp / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "O_TMPFILE": lambda: os.open(mp, os.O_TMPFILE | os.O_RDWR),
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
        "chown": lambda: os.chown(mounted.path(active), 12345, 12345),
        "setxattr": lambda: os.setxattr(mounted.path(active), "user.x", b"1"),
    }
    for what, call in calls.items():
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EPERM, what
    with pytest.raises(NotADirectoryError):
        os.rmdir(mounted.path(active))
    assert sorted(os.listdir(mp)) == sorted(fuse.file_name(k) for k in KEYS)
    os.truncate(mounted.path(active), SIZE)
    os.utime(mounted.path(active))
    os.chmod(mounted.path(active), 0o644)
    os.chown(mounted.path(active), os.geteuid(), os.getegid())


def test_a_file_of_a_committed_snapshot_stops_writing(mounted: Mounted) -> None:
    _, active, _ = KEYS
    fd = os.open(mounted.path(active), os.O_RDWR)
    try:
        os.pwrite(fd, b"before", 0)
        mounted.store.commit("committed", active)
        for offset in (0, 5 * CHUNK):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"after", offset)
            assert exc.value.errno in (errno.ESTALE, errno.EIO)
    finally:
        os.close(fd)
    with mounted.store.reader("committed") as v:
        assert v.pread(6, 0) == b"before"
        assert v.pread(5, 5 * CHUNK) == bytes(5)
    names = os.listdir(mounted.mountpoint)
    assert fuse.file_name("committed") in names
    assert fuse.file_name(active) not in names
    with open(mounted.path("committed"), "rb") as f:
        assert f.read(6) == b"before"


def test_fsync_makes_writes_durable(mounted: Mounted, tmp_path: Path) -> None:
    """A copy of the store's files taken right after fsync (what a power cut would leave)
    holds the write; so does the store reopened after unmounting."""
    data = pattern(5, 3 * CHUNK + 100)
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
    mounted.mount.close()
    mounted.store.close()
    mounted.store = mounted.open_store()
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(len(data), 7 * CHUNK) == data


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
    finally:
        os.close(fd)


def test_punch_hole_gives_space_back(mounted: Mounted) -> None:
    mounted.store.prepare("punched").close()
    path = mounted.path("punched")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, pattern(9, 6 * CHUNK), 0)
        assert mounted.store.usage("punched").size == 6 * CHUNK
        assert os.fstat(fd).st_blocks * 512 == 6 * CHUNK
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CHUNK, 3 * CHUNK)
        assert mounted.store.usage("punched").size == 3 * CHUNK
        assert os.stat(path).st_blocks * 512 == 3 * CHUNK
        assert os.pread(fd, 3 * CHUNK, CHUNK) == bytes(3 * CHUNK)
        assert os.pread(fd, CHUNK, 0) == pattern(9, CHUNK)
        with pytest.raises(OSError) as exc:
            fallocate(fd, 0, 0, CHUNK)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_mmap_in_another_process(mounted: Mounted) -> None:
    """Shared mappings of both kinds of file work. Another process maps them: a page fault
    in the server's own process would wait for a server that cannot run."""
    program = f"""
import mmap, os
fd = os.open({mounted.path(KEYS[1])!r}, os.O_RDWR)
with mmap.mmap(fd, 4 * {CHUNK}) as m:
    assert m[: 3 * {CHUNK}] == open({mounted.path(KEYS[0])!r}, "rb").read(3 * {CHUNK})
    m[100:105] = b"world"
    m.flush()
os.close(fd)
fd = os.open({mounted.path(KEYS[0])!r}, os.O_RDONLY)
with mmap.mmap(fd, {SIZE}, prot=mmap.PROT_READ) as m:
    print(m[{SIZE} - 5 :].hex(), m[5:10].hex())
os.close(fd)
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [bytes(5).hex(), pattern(1, 3 * CHUNK)[5:10].hex()]
    with mounted.store.mounts(KEYS[1]) as v:
        assert v.pread(5, 100) == b"world"


# -- the namespace changing under the mount ---------------------------------------


def test_snapshots_come_and_go(mounted: Mounted) -> None:
    name = fuse.file_name("later/one")
    assert name not in os.listdir(mounted.mountpoint)
    mounted.store.prepare("later/one").close()
    assert name in os.listdir(mounted.mountpoint)
    assert os.stat(mounted.path("later/one")).st_size == SIZE
    mounted.store.remove("later/one")
    assert name not in os.listdir(mounted.mountpoint)
    assert not os.path.exists(mounted.path("later/one"))
    mounted.store.remove(KEYS[2])
    assert sorted(os.listdir(mounted.mountpoint)) == sorted(fuse.file_name(k) for k in KEYS[:2])


def test_a_big_directory_reads_whole(mounted: Mounted) -> None:
    keys = [f"many/{i:04d}: {'x' * 60}" for i in range(300)]
    for key in keys:
        mounted.store.prepare(key, size=CHUNK).close()
    names = set(os.listdir(mounted.mountpoint))
    assert names == {fuse.file_name(k) for k in (*KEYS, *keys)}
    with os.scandir(mounted.mountpoint) as entries:
        sizes = {e.name: e.stat().st_size for e in entries}
    assert sizes[fuse.file_name(keys[-1])] == CHUNK


# -- concurrency ------------------------------------------------------------------


def test_threads_and_processes_at_once(mounted: Mounted) -> None:
    need("dd")
    base, active, _ = KEYS
    mounted.store.prepare("second").close()
    failures: list[BaseException] = []

    def writer(key: str, seed: int, start: int) -> None:
        try:
            fd = os.open(mounted.path(key), os.O_RDWR)
            try:
                for i in range(16):
                    data = pattern(seed + i, CHUNK + 1000)
                    offset = start + i * 2 * CHUNK
                    os.pwrite(fd, data, offset)
                    assert os.pread(fd, len(data), offset) == data
            finally:
                os.close(fd)
        except BaseException as exc:
            failures.append(exc)

    def reader() -> None:
        try:
            with open(mounted.path(base), "rb") as f:
                for _ in range(20):
                    f.seek(0)
                    assert f.read(3 * CHUNK) == pattern(1, 3 * CHUNK)
        except BaseException as exc:
            failures.append(exc)

    source = Path(mounted.directory).parent / "dd-source"
    source.write_bytes(pattern(77, 2 * MIB))
    procs = [
        subprocess.Popen(
            [need("dd"), f"if={source}", f"of={mounted.path(key)}", "bs=1M", "seek=12", "conv=notrunc,fsync"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for key in (active, "second")
    ]
    threads = [
        threading.Thread(target=writer, args=(active, 1000, 0)),
        threading.Thread(target=writer, args=(active, 2000, 4 * MIB)),
        threading.Thread(target=writer, args=("second", 3000, 0)),
        threading.Thread(target=reader),
        threading.Thread(target=reader),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for p in procs:
        assert p.wait(TIMEOUT) == 0, p.stderr.read() if p.stderr else ""
        if p.stderr:
            p.stderr.close()
    assert not failures, failures
    for key, seeds in ((active, ((1000, 0), (2000, 4 * MIB))), ("second", ((3000, 0),))):
        with mounted.store.mounts(key) as v:
            for seed, start in seeds:
                for i in range(16):
                    data = pattern(seed + i, CHUNK + 1000)
                    assert v.pread(len(data), start + i * 2 * CHUNK) == data
            assert v.pread(2 * MIB, 12 * MIB) == pattern(77, 2 * MIB)


# -- the mount's life ----------------------------------------------------------------


def test_unmount_from_outside_ends_the_mount(mounted: Mounted) -> None:
    assert mounted.mount.running
    run("fusermount3", "-u", str(mounted.mountpoint))
    assert mounted.mount.wait(10)
    assert not mounted.mount.running
    assert not any(str(mounted.mountpoint) in line for line in fuse_mounts())


def test_ext4_on_a_file(mounted: Mounted, tmp_path: Path) -> None:
    key = "ext4 volume"
    mounted.store.prepare(key, size=64 * MIB).close()
    path = mounted.path(key)
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", path)
    content = pattern(11, 200_000)
    source = tmp_path / "content"
    source.write_bytes(content)
    run("debugfs", "-w", "-R", f"write {source} blob", path)
    run("e2fsck", "-f", "-n", path)
    out = tmp_path / "out"
    run("debugfs", "-R", f"dump blob {out}", path)
    assert out.read_bytes() == content
    assert mounted.store.usage(key).size > 0
