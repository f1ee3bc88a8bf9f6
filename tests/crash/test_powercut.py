"""Power cuts: a file system that forgets every change not yet fsynced, and cowstore on it.

SIGKILL (tests/crash/test_sigkill.py) leaves the page cache intact, so it cannot catch a missing
or misordered fsync. Here the store lives on tests/harness/powercut_fs.py, a FUSE file system that
keeps every change in memory until the fsync POSIX requires for it: file contents at
fsync of the file, names at fsync of their directory. A cut drops the rest, and its
backing directory is then what a disk would hold after the power loss.

Each round mounts the disk afresh, opens the store, checks it against what the previous
round left durable, runs tests/harness/crashload.py's random workload in this process, and cuts
the power: between operations, at the n-th fsync from now (before or after it reaches the
disk), or from a timer thread in the middle of whatever runs. Half the cuts lose every
unsynced write; the other half first write back a random prefix of each file's unsynced
writes, as a disk may. Half the mounts bypass the page cache (direct_io). The store
object is then abandoned, never closed. The verdict is test_sigkill.py's: everything up to
the last durable step exactly; later writes per chunk as some prefix of them in order; a
call cut short may or may not have happened. The last round's disk is also opened without
FUSE.

In the full-disk scenarios the file system also runs out of space at random moments for a
while (see `Filler`), so writes, flushes and snapshotter calls meet ENOSPC and fail with
`NoSpace` (logged as ``failed``); space comes back and the workload goes on; one more cut
mode strikes at one of the first fsyncs on a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cowstore
from cowstore.errors import NoSpace, Unavailable
from tests.crash.test_sigkill import Model, differences, observe, replay
from tests.data import pattern
from tests.harness import crashload
from tests.harness.crashload import CHUNK, SIZE, EarlyRelease, Workload
from tests.harness.powercut_fs import PowerCutMount, mounted, unavailable

STRESS = bool(os.environ.get("COWSTORE_STRESS"))
CUTS = int(os.environ.get("COWSTORE_POWERCUTS", 20))
STRESS_CUTS = int(os.environ.get("COWSTORE_POWERCUTS", 400))
SELF_TEST_CUTS = 40
MAX_STEPS = 300
MODES = ("between", "fsync", "timer")
FULL_MODES = (*MODES, "full-fsync")
FULL_CUTS = int(os.environ.get("COWSTORE_FULL_POWERCUTS", 30))
STRESS_FULL_CUTS = int(os.environ.get("COWSTORE_FULL_POWERCUTS", 300))


@pytest.fixture(scope="module")
def fuse_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips (fails in CI) where FUSE, libfuse 3 or mfusepy is missing, or mounting is refused."""
    why = unavailable()
    if why is None:
        where = tmp_path_factory.mktemp("probe")
        try:
            with PowerCutMount(where / "disk", where / "mnt") as m:
                (m.path / "probe").write_bytes(b"ok")
        except (OSError, RuntimeError, TimeoutError) as exc:
            why = f"cannot mount the power-cut file system: {exc}"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"power-cut tests must run in CI: {why}")
        pytest.skip(why)


@pytest.fixture
def disk(fuse_works: None, tmp_path: Path) -> Path:
    """An empty disk (a backing directory) for power-cut mounts."""
    (tmp_path / "disk").mkdir()
    return tmp_path / "disk"


def mount(disk: Path, *, direct_io: bool = False) -> PowerCutMount:
    return PowerCutMount(disk, disk.parent / "mnt", direct_io=direct_io)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync_file: bool, sync_dir: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync_file:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync_dir:
        fsync_path(path.parent)


# -- the file system catches what it must -----------------------------------------------


@pytest.mark.parametrize("fsync", [False, True])
def test_a_write_survives_a_cut_only_if_it_was_fsynced(disk: Path, fsync: bool) -> None:
    with mount(disk) as m:
        write_file(m.path / "f", b"", sync_file=True, sync_dir=True)
        write_file(m.path / "f", b"precious", sync_file=fsync, sync_dir=False)
        assert (m.path / "f").read_bytes() == b"precious"
        m.cut()
    assert (disk / "f").read_bytes() == (b"precious" if fsync else b"")


@pytest.mark.parametrize("fsync_dir", [False, True])
def test_a_new_name_survives_a_cut_only_if_its_directory_was_fsynced(disk: Path, fsync_dir: bool) -> None:
    with mount(disk) as m:
        (m.path / "d").mkdir()
        fsync_path(m.path)
        write_file(m.path / "d" / "f", b"data", sync_file=True, sync_dir=fsync_dir)
        fsync_path(m.path)
        m.cut()
    assert os.listdir(disk / "d") == (["f"] if fsync_dir else [])
    if fsync_dir:
        assert (disk / "d" / "f").read_bytes() == b"data"


def test_a_durable_name_of_a_file_never_fsynced_is_an_empty_file(disk: Path) -> None:
    with mount(disk) as m:
        write_file(m.path / "f", b"data", sync_file=False, sync_dir=True)
        m.cut()
    assert (disk / "f").read_bytes() == b""


def test_rename_and_unlink_are_undone_by_a_cut_before_the_directory_fsync(disk: Path) -> None:
    with mount(disk) as m:
        write_file(m.path / "a", b"A", sync_file=True, sync_dir=False)
        write_file(m.path / "b", b"B", sync_file=True, sync_dir=True)
        os.rename(m.path / "a", m.path / "c")
        os.unlink(m.path / "b")
        assert sorted(os.listdir(m.path)) == ["c"]
        m.cut()
    assert sorted(os.listdir(disk)) == ["a", "b"]
    assert (disk / "a").read_bytes() + (disk / "b").read_bytes() == b"AB"


def test_rename_over_a_name_is_durable_at_the_directory_fsync(disk: Path) -> None:
    with mount(disk) as m:
        write_file(m.path / "target", b"old", sync_file=True, sync_dir=True)
        write_file(m.path / "tmp", b"new", sync_file=True, sync_dir=False)
        os.rename(m.path / "tmp", m.path / "target")
        fsync_path(m.path)
        m.cut()
    assert os.listdir(disk) == ["target"]
    assert (disk / "target").read_bytes() == b"new"


def test_truncate_and_punched_holes_are_undone_by_a_cut_before_fsync(disk: Path) -> None:
    with mount(disk) as m:
        write_file(m.path / "f", b"x" * 10000, sync_file=True, sync_dir=True)
        fd = os.open(m.path / "f", os.O_RDWR)
        os.ftruncate(fd, 10)
        os.ftruncate(fd, 100)
        assert os.pread(fd, 100, 0) == b"x" * 10 + bytes(90)
        os.close(fd)
        m.cut()
    assert (disk / "f").read_bytes() == b"x" * 10000


def test_a_hole_punched_and_fsynced_reads_as_zeros(disk: Path) -> None:
    from cowstore import fallocate

    with mount(disk) as m:
        write_file(m.path / "f", b"x" * 3 * 4096, sync_file=True, sync_dir=True)
        fd = os.open(m.path / "f", os.O_RDWR)
        assert fallocate.punch_hole(fd, 4096, 4096)
        assert os.pread(fd, 3 * 4096, 0) == b"x" * 4096 + bytes(4096) + b"x" * 4096
        os.fsync(fd)
        os.close(fd)
    assert (disk / "f").read_bytes() == b"x" * 4096 + bytes(4096) + b"x" * 4096


def test_a_write_at_a_huge_offset_is_held_sparsely(disk: Path) -> None:
    offset = 1 << 40
    with mount(disk) as m:
        fd = os.open(m.path / "f", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"far", offset)
        assert os.fstat(fd).st_size == offset + 3
        assert os.pread(fd, 6, offset - 3) == b"\0\0\0far"
        os.fsync(fd)
        os.close(fd)
        fsync_path(m.path)
    st = os.stat(disk / "f")
    assert st.st_size == offset + 3 and st.st_blocks * 512 < 1 << 20
    with open(disk / "f", "rb") as f:
        f.seek(offset)
        assert f.read() == b"far"


def test_handles_opened_before_a_cut_fail_and_reach_nothing(disk: Path) -> None:
    with mount(disk) as m:
        write_file(m.path / "f", b"before", sync_file=True, sync_dir=True)
        fd = os.open(m.path / "f", os.O_RDWR)
        try:
            m.cut()
            for call in (
                lambda: os.pwrite(fd, b"after!", 0),
                lambda: os.pread(fd, 6, 0),
                lambda: os.fsync(fd),
            ):
                with pytest.raises(OSError) as info:
                    call()
                assert info.value.errno == errno.EIO
            with pytest.raises(OSError):
                (m.path / "new").write_bytes(b"x")
        finally:
            os.close(fd)
    assert os.listdir(disk) == ["f"]
    assert (disk / "f").read_bytes() == b"before"


def test_an_unlinked_open_file_keeps_working_until_closed(disk: Path) -> None:
    with mount(disk) as m:
        fd = os.open(m.path / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.unlink(m.path / "f")
            os.pwrite(fd, b"ghost", 0)
            os.ftruncate(fd, 3)
            assert os.pread(fd, 10, 0) == b"gho"
            os.fsync(fd)
        finally:
            os.close(fd)
        assert os.listdir(m.path) == []
        fsync_path(m.path)
    assert os.listdir(disk) == []


@pytest.mark.parametrize("before", [True, False])
def test_an_armed_cut_strikes_at_the_chosen_fsync(disk: Path, before: bool) -> None:
    with mount(disk) as m:
        write_file(m.path / "f", b"", sync_file=True, sync_dir=True)
        m.arm(2, before=before)
        fd = os.open(m.path / "f", os.O_WRONLY)
        os.write(fd, b"one")
        os.fsync(fd)
        os.pwrite(fd, b"two", 0)
        with pytest.raises(OSError):
            os.fsync(fd)
        os.close(fd)
        assert m.dead
    assert (disk / "f").read_bytes() == (b"one" if before else b"two")


def test_a_cut_with_writeback_keeps_a_prefix_of_the_unsynced_writes(disk: Path) -> None:
    seen = set()
    for seed in range(6):
        with mount(disk) as m:
            write_file(m.path / "f", b"", sync_file=True, sync_dir=True)
            fd = os.open(m.path / "f", os.O_WRONLY)
            for i, piece in enumerate((b"a", b"b", b"c")):
                os.pwrite(fd, piece, i)
            os.ftruncate(fd, 2)
            os.close(fd)
            m.cut(writeback=seed)
        seen.add((disk / "f").read_bytes())
    assert seen <= {b"", b"a", b"ab", b"abc"}
    assert len(seen) > 1


@pytest.mark.parametrize("mode", ["wal", "wal-exclusive", "wal-exclusive-direct-io"])
def test_sqlite_keeps_committed_transactions_and_drops_the_open_one(disk: Path, mode: str) -> None:
    """SQLite's own fsyncs suffice on this file system (normal WAL mmaps its -shm file)."""
    with mount(disk, direct_io=mode.endswith("direct-io")) as m:
        db = sqlite3.connect(m.path / "db", isolation_level=None)
        if "exclusive" in mode:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x)")
        for i in range(20):
            db.execute("INSERT INTO t VALUES (?)", (i,))
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (-1)")
        m.cut()
        with contextlib.suppress(sqlite3.Error):
            db.close()
    db = sqlite3.connect(disk / "db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert [x for (x,) in db.execute("SELECT x FROM t ORDER BY rowid")] == list(range(20))
    finally:
        db.close()


def test_a_full_file_system_refuses_growth_until_space_comes_back(disk: Path) -> None:
    with mount(disk) as m:
        write_file(m.path / "f", b"x" * 10, sync_file=True, sync_dir=True)
        fd = os.open(m.path / "f", os.O_RDWR)
        try:
            m.space(4096)
            assert os.statvfs(m.path).f_bavail * os.statvfs(m.path).f_frsize <= 4096
            assert os.pwrite(fd, b"y" * 8000, 0) == 4096, "a write that fits in part is short, at a block"
            assert m.state()["free"] == 10
            for call in (
                lambda: os.pwrite(fd, b"z" * 20, 4096),
                lambda: os.posix_fallocate(fd, 0, 8192),
            ):
                with pytest.raises(OSError) as info:
                    call()
                assert info.value.errno == errno.ENOSPC
            assert os.statvfs(m.path).f_bavail == 0
            assert os.pwrite(fd, b"inside", 0) == 6, "a write inside the file takes no space"
            os.ftruncate(fd, 8192)
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"z", 8000)
            assert info.value.errno == errno.ENOSPC, "the hole an extending truncate leaves takes no space"
            os.ftruncate(fd, 50)
            assert os.pwrite(fd, b"w" * 60, 50) == 60, "a truncate gives back what it cuts off"
            m.space(0, cow=True)
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"cow", 0)
            assert info.value.errno == errno.ENOSPC, "with cow, an overwrite takes space too"
            m.space(None)
            assert os.pwrite(fd, b"more", 110) == 4
            assert os.pread(fd, 200, 0) == b"inside" + b"y" * 44 + b"w" * 60 + b"more"
            os.fsync(fd)
        finally:
            os.close(fd)
    assert (disk / "f").read_bytes() == b"inside" + b"y" * 44 + b"w" * 60 + b"more"


def test_blocks_reserved_past_the_end_take_space_and_a_truncate_gives_them_back(disk: Path) -> None:
    from cowstore import fallocate as _fs

    with mount(disk) as m:
        fd = os.open(m.path / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            m.space(8192)
            assert _fs.preallocate(fd, 0, 8192)
            assert os.fstat(fd).st_size == 0 and m.state()["free"] == 0
            assert os.pwrite(fd, b"r" * 8192, 0) == 8192, "a write into reserved blocks takes no space"
            assert not _fs.preallocate(fd, 8192, 1)
            assert _fs.preallocate(fd, 0, 8192), "reserving what the file already takes needs nothing"
            os.ftruncate(fd, 4096)
            assert m.state()["free"] == 4096
        finally:
            os.close(fd)


def test_sqlite_gets_sqlite_full_on_a_full_file_system_and_loses_nothing_committed(disk: Path) -> None:
    with mount(disk) as m:
        db = sqlite3.connect(m.path / "db", isolation_level=None)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (x)")
            db.execute("INSERT INTO t VALUES (1)")
            m.space(0, cow=True)
            with pytest.raises(sqlite3.OperationalError, match="full"):
                db.execute("INSERT INTO t VALUES (?)", (b"z" * 100000,))
            m.space(None)
            db.execute("INSERT INTO t VALUES (2)")
        finally:
            db.close()
        m.cut()
    db = sqlite3.connect(disk / "db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert [x for (x,) in db.execute("SELECT x FROM t ORDER BY rowid")] == [1, 2]
    finally:
        db.close()


# -- cowstore under power cuts -----------------------------------------------------------


class MemoryLog:
    """crashload's log kept in memory: the process survives the cut, so the log needs no disk."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, ev: str, **fields: Any) -> None:
        self.records.append(json.loads(json.dumps({"ev": ev, **fields})))

    def sync(self) -> None:
        return None


class SkipDataFsync:
    """Wraps an engine so that a durable step never fsyncs the data file: a self-test's bug."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def flush_data(self) -> None:
        return None


class LateDataFsync(SkipDataFsync):
    """Fsyncs the data file after the metadata naming it is committed, not before: a self-test's bug."""

    def release(self, slots: Any) -> None:
        self._engine.flush_data()
        self._engine.release(slots)


class Filler:
    """Takes the file system's space away at random moments between calls, and gives it back.

    While full, from 0 to 3 chunks are left (so a write may land in part), and half the
    time overwrites take space too (``cow``, so writes in place and SQLite's reused WAL
    fail as well). A fill lasts 1 to 20 calls; in mode ``full-fsync`` the first one lasts
    to the end, and the power is cut at one of the first three fsyncs after it begins.
    Each change is logged (``space`` records, which `replay` ignores) for the report.
    """

    def __init__(self, m: PowerCutMount, rng: random.Random, r: Round, log: MemoryLog) -> None:
        self.m, self.rng, self.r, self.log = m, rng, r, log
        self.until: int | None = None

    def tick(self, n: int) -> None:
        rng = self.rng
        if self.until is not None:
            if n >= self.until:
                self.m.space(None)
                self.log.record("space", n=n, free=None)
                self.until = None
            return
        if rng.random() >= 0.1:
            return
        free, cow = rng.choice([0, rng.randrange(3 * CHUNK)]), rng.random() < 0.5
        self.m.space(free, cow=cow)
        self.log.record("space", n=n, free=free, cow=cow)
        self.r.fills += 1
        self.until = n + rng.randint(1, 20)
        if self.r.mode == "full-fsync" and self.r.fills == 1:
            self.until = MAX_STEPS
            self.m.arm(rng.randint(1, 3), before=rng.random() < 0.5, writeback=self.r.writeback)


@dataclass
class Round:
    """One power-on period: what ran, how the power went, and what the next boot found wrong."""

    master: int
    number: int
    seed: int
    mode: str
    direct_io: bool
    writeback: int | None
    close: bool
    full: bool = False
    fills: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    why: str = ""
    interrupted: str | None = None
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        tail = "\n    ".join(json.dumps(r)[:300] for r in self.records[-8:])
        problems = "\n    ".join(self.problems[:12])
        ops = sum(1 for r in self.records if r["ev"] == "begin")
        return (
            f"COWSTORE_POWERCUT_SEED={self.master}, round {self.number} (seed {self.seed}, "
            f"cut {self.mode}, {self.why}; direct_io={self.direct_io}; closed first: {self.close}; "
            f"disk full {self.fills} times; "
            f"interrupted {self.interrupted}), {ops} operations:\n"
            f"  problems:\n    {problems}\n  last records:\n    {tail}"
        )


def abandon(store: cowstore.Store) -> None:
    """Let go of a store whose power is gone: its handles point into a dead mount, so this writes nothing."""
    if store._closed:
        return
    with contextlib.suppress(Exception):
        store._meta.close()
    for fd in (store._data_fd, store._lock_fd):
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    store._closed = True


def verify(store: cowstore.Store, candidates: list[Model]) -> tuple[Model, list[str]]:
    """The store as found, and how it falls outside every state the model allows."""
    seen, problems = observe(store)
    report = store.check()
    problems += [f"check: {p.what} ({p.where})" for p in report.problems]
    if not problems:
        verdicts = [differences(seen, expected) for expected in candidates]
        if all(verdicts):
            problems = [p for v in verdicts for p in v]
    return seen, problems


def run_until_cut(m: PowerCutMount, store: cowstore.Store, r: Round, rng: random.Random, steps: int) -> None:
    """The workload, until the power goes; an error while the power is still on fails the test."""
    log = MemoryLog()
    r.records = log.records
    workload = Workload(store, log, r.seed)
    filler = Filler(m, rng, r, log) if r.full else None
    steps = rng.randint(0, steps) if r.mode == "between" or r.close else MAX_STEPS
    timer = None
    if r.mode == "fsync":
        m.arm(rng.randint(1, 10), before=rng.random() < 0.5, writeback=r.writeback)
    elif r.mode == "timer":
        timer = threading.Timer(rng.uniform(0.0, 0.15), m.cut, kwargs={"writeback": r.writeback})
        timer.start()
    try:
        for n in range(steps):
            if filler is not None:
                filler.tick(n)
            workload.step(n)
        if r.close:
            log.record("begin", n=steps, op="flush", via=None)
            try:
                store.close()
            except NoSpace as exc:
                log.record("failed", n=steps, error=str(exc))
            else:
                log.record("done", n=steps)
                log.record("durable", n=steps)
    except Exception as exc:
        # A store that failed (a data fsync that reported ENOSPC, as FUSE writeback does when
        # the file system fills) refuses everything until reopened: like a crash, the round
        # ends there, and the same verdict applies.
        if not m.dead and not isinstance(exc, Unavailable):
            raise
        begun = [rec for rec in log.records if rec["ev"] == "begin"]
        r.interrupted = f"{begun[-1]['op']} ({type(exc).__name__})" if begun else type(exc).__name__
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
    r.why = m.cut(writeback=r.writeback)["why"]


def power_cut_rounds(
    tmp_path: Path,
    engine: str,
    cuts: int,
    *,
    sabotage: type | Callable[[cowstore.Store], None] | None = None,
    modes: tuple[str, ...] = MODES,
    writeback: float = 0.5,
    steps: int = 40,
    full: bool = False,
    master: int | None = None,
) -> list[Round]:
    """`cuts` rounds of boot, check, work and cut; stops at the first round whose boot finds a problem."""
    if master is None:
        master = int(os.environ.get("COWSTORE_POWERCUT_SEED", random.randrange(1 << 32)))
    rng = random.Random(master)
    disk = tmp_path / "disk"
    disk.mkdir()
    candidates: list[Model] = [{}]
    rounds: list[Round] = []
    for number in range(cuts):
        writeback_seed = rng.randrange(1 << 32) if rng.random() < writeback else None
        r = Round(
            master,
            number,
            rng.randrange(1 << 32),
            rng.choice(modes),
            direct_io=rng.random() < 0.5,
            writeback=writeback_seed,
            close=rng.random() < 0.25,
            full=full,
        )
        with mount(disk, direct_io=r.direct_io) as m:
            try:
                store = cowstore.open(
                    m.path / "store", create=number == 0, chunk_size=CHUNK, default_size=SIZE, engine=engine
                )
            except Exception as exc:
                if not rounds:
                    raise
                rounds[-1].problems = [f"reopen failed: {exc!r}"]
                return rounds
            try:
                if number:
                    _, rounds[-1].problems = verify(store, candidates)
                    if rounds[-1].problems:
                        return rounds
                if isinstance(sabotage, type):
                    crashload.sabotage(store, sabotage)
                elif sabotage is not None:
                    sabotage(store)
                start, _ = observe(store)
                run_until_cut(m, store, r, rng, steps)
            finally:
                abandon(store)
        candidates = replay(start, r.records)
        rounds.append(r)
    assert not mounted(disk.parent / "mnt")
    try:
        store = cowstore.open(disk / "store", engine=engine)
    except Exception as exc:
        rounds[-1].problems = [f"reopen without FUSE failed: {exc!r}"]
        return rounds
    with store:
        _, rounds[-1].problems = verify(store, candidates)
    return rounds


def check_survives(tmp_path: Path, engine: str, cuts: int, **how: Any) -> list[Round]:
    began = time.monotonic()
    rounds = power_cut_rounds(tmp_path, engine, cuts, **how)
    failed = [r for r in rounds if r.problems]
    assert not failed, failed[0].report()
    ops = sum(1 for r in rounds for rec in r.records if rec["ev"] == "begin")
    modes = Counter(r.mode for r in rounds)
    cut_short = Counter(r.interrupted.split()[0] for r in rounds if r.interrupted)
    closes = sum(r.close for r in rounds)
    print(
        f"\n{engine}: {len(rounds)} power cuts ({dict(modes)}), {ops} operations, "
        f"{closes} closed first, calls cut short: {dict(cut_short)}, {time.monotonic() - began:.1f} s"
    )
    return rounds


def nospace_calls(rounds: list[Round]) -> Counter[str]:
    """The calls that failed with `NoSpace`, by operation."""
    calls: Counter[str] = Counter()
    for r in rounds:
        begun = {rec["n"]: rec["op"] for rec in r.records if rec["ev"] == "begin"}
        calls.update(begun[rec["n"]] for rec in r.records if rec["ev"] == "failed")
    return calls


def check_survives_a_full_disk(tmp_path: Path, engine: str, cuts: int) -> None:
    rounds = check_survives(tmp_path, engine, cuts, full=True, modes=FULL_MODES, steps=80)
    calls = nospace_calls(rounds)
    fills = sum(r.fills for r in rounds)
    print(f"{engine}: the disk filled {fills} times; calls that failed with NoSpace: {dict(calls)}")
    assert calls, f"in {len(rounds)} rounds the disk filled {fills} times, but no call met it"


def test_flushed_writes_and_snapshotter_calls_survive_power_cuts(
    engine: str, fuse_works: None, tmp_path: Path
) -> None:
    check_survives(tmp_path, engine, CUTS)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="hundreds of power cuts: run by `make stress` (COWSTORE_STRESS=1)")
def test_flushed_writes_and_snapshotter_calls_survive_hundreds_of_power_cuts(
    engine: str, fuse_works: None, tmp_path: Path
) -> None:
    check_survives(tmp_path, engine, STRESS_CUTS)


def test_flushed_writes_and_snapshotter_calls_survive_power_cuts_on_a_disk_that_fills_up(
    engine: str, fuse_works: None, tmp_path: Path
) -> None:
    """Full-disk rounds: every call that met ENOSPC failed with `NoSpace` and changed nothing
    durable (a data call: as read back), nothing acknowledged is lost, check(data=True) is clean."""
    check_survives_a_full_disk(tmp_path, engine, FULL_CUTS)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="hundreds of power cuts: run by `make stress` (COWSTORE_STRESS=1)")
def test_flushed_writes_and_snapshotter_calls_survive_hundreds_of_power_cuts_on_a_disk_that_fills_up(
    engine: str, fuse_works: None, tmp_path: Path
) -> None:
    check_survives_a_full_disk(tmp_path, engine, STRESS_FULL_CUTS)


def test_a_write_the_full_disk_refuses_leaves_no_trace_in_reads(engine: str, disk: Path) -> None:
    """An overwrite in place that fails with `NoSpace` changes nothing a read sees, then,
    after a flush, or after a power cut.

    FUSE copies a write into the page cache before its server answers, and when the answer
    is ENOSPC it only marks the pages not up to date. The Cython engine reads through a
    mapping of the data file, which kept showing the refused bytes until the kernel read
    the pages again: a read right after the failed write returned bytes the file never
    held, and later the old bytes came back without any write (the full-disk power-cut
    rounds logged the first as the range's state and found the second after the cut)."""
    old, new = pattern(CHUNK, 1), pattern(CHUNK, 2)
    with mount(disk) as m:
        store = cowstore.open(
            m.path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine
        )
        try:
            vol = store.prepare("a")
            vol.pwrite(old, CHUNK)
            # Durable, so the slot is no longer fresh (its overwrites are pwrite), and no
            # blocks reserved past the end for the retry after NoSpace to give back.
            store.flush()
            store.compact()
            assert vol.pread(CHUNK, CHUNK) == old
            m.space(0, cow=True)
            with pytest.raises(NoSpace):
                vol.pwrite(new[:300], CHUNK + 100)
            assert vol.pread(CHUNK, CHUNK) == old, "a read shows bytes the file system refused"
            m.space(None)
            store.flush()
            assert vol.pread(CHUNK, CHUNK) == old
        finally:
            abandon(store)
        m.cut()
    with cowstore.open(disk / "store", engine=engine) as store:
        assert store.mounts("a").pread(CHUNK, CHUNK) == old


def test_a_write_the_full_disk_refuses_keeps_the_earlier_writes_of_a_new_partial_chunk(
    engine: str, disk: Path
) -> None:
    """A refused write into a new chunk loses none of its earlier, acknowledged writes.

    The Cython engine copies overwrites of a fresh slot into its mapping; those copies sit
    in the page cache until fsync. A refused pwrite into the same page (here: filling in
    another sub-block of the partial chunk) leaves the page not up to date, and reading it
    again (a pread, or a fault once the mapping dropped it) replaces the copies with the
    file's older bytes. So a fresh slot's pages are written through the mapping as far as
    the file holds them, never by pwrite; and only pages no copy dirtied are dropped from
    the mapping after a failed pwrite (the test above)."""
    base, first, second = pattern(CHUNK, 3), b"x" * 10, b"y" * 10
    with mount(disk) as m:
        store = cowstore.open(
            m.path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine
        )
        try:
            store.prepare("b").pwrite(base, CHUNK)
            store.commit("img", "b")
            vol = store.prepare("c", "img")
            vol.pwrite(first, CHUNK + 5)  # a partial chunk (one sub-block) in a new slot
            vol.pwrite(base, 2 * CHUNK)  # the file grows past that slot
            store.compact()
            vol.pwrite(second, CHUNK + 5)  # an overwrite of a fresh slot (Cython: a copy)
            m.space(0, cow=True)
            with contextlib.suppress(NoSpace):
                vol.pwrite(b"z" * 10, CHUNK + 3000)  # another sub-block of that chunk
            m.space(None)
            assert vol.pread(10, CHUNK + 5) == second
            store.flush()
            assert vol.pread(10, CHUNK + 5) == second
            end = vol.pread(10, CHUNK + 3000)
            assert end in (b"z" * 10, base[3000:3010])
        finally:
            abandon(store)
        m.cut()
    with cowstore.open(disk / "store", engine=engine) as store:
        got = store.mounts("c").pread(CHUNK, CHUNK)
        assert got[5:15] == second and got[3000:3010] == end
        assert got[:5] + got[15:3000] + got[3010:] == base[:5] + base[15:3000] + base[3010:]


def forget_unsaved(store: cowstore.Store) -> None:
    """Breaks the store's full-disk rule: what a failed durable step held back counts as saved (dropped)."""
    persist = store._persist

    def broken(*args: Any, **kwargs: Any) -> Any:
        try:
            return persist(*args, **kwargs)
        except NoSpace:
            store._unsaved = None
            raise

    store._persist = broken  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("sabotage", "how"),
    [
        (SkipDataFsync, {"modes": ("between",)}),
        (LateDataFsync, {"modes": ("fsync",)}),
        (EarlyRelease, {"modes": ("between",), "writeback": 1.0, "steps": MAX_STEPS}),
        (forget_unsaved, {"modes": ("between",), "full": True, "steps": 80}),
    ],
    ids=["data-fsync-missing", "data-fsync-after-metadata", "freed-slot-reused-early", "unsaved-dropped"],
)
def test_harness_catches_a_store_that_breaks_a_durability_rule(
    fuse_works: None, tmp_path: Path, sabotage: Any, how: dict[str, Any]
) -> None:
    """The harness's own test: each broken rule must be caught (early slot reuse only with writeback;
    changes a failed flush held back and then dropped only on a disk that fills up).

    Each of these bugs leaves durable metadata naming data that is not on the disk, which
    the next boot finds as bytes matching no allowed state, a slot past the data file's
    end (named by a page, or read short), or (when a commit had sealed the chunk) a chunk
    failing its checksum."""
    rounds = power_cut_rounds(tmp_path, "python", SELF_TEST_CUTS, sabotage=sabotage, **how)
    problems = rounds[-1].problems
    assert problems, f"{len(rounds)} power cuts of a store with a {sabotage.__name__} bug went unnoticed"
    if how.get("full"):
        assert nospace_calls(rounds), "the disk never filled up while a call ran"
        # A control: the same rounds (cut between calls, so they repeat) on the store as it is.
        master = rounds[0].master
        (tmp_path / "control").mkdir()
        control = power_cut_rounds(tmp_path / "control", "python", len(rounds), master=master, **how)
        assert not control[-1].problems, "the store fails these rounds unbroken:\n" + control[-1].report()
    signs = ("matches neither", "beyond the pool", "the data file is truncated", "fails its checksum")
    assert any(sign in p for p in problems for sign in signs), rounds[-1].report()


# -- store creation ----------------------------------------------------------------------


def create(path: Path) -> None:
    cowstore.open(path, create=True, chunk_size=CHUNK, default_size=SIZE).close()


def test_store_creation_cut_at_any_fsync_leaves_no_store_or_a_whole_store(
    fuse_works: None, tmp_path: Path
) -> None:
    """A cut before or after each fsync of `open(create=True)`: no store or an empty whole one, never half."""
    first = tmp_path / "first"
    first.mkdir()
    with mount(first) as m:
        create(m.path / "store")
        syncs = m.state()["syncs"]
    assert syncs >= 4
    outcomes: Counter[str] = Counter()
    for n in range(1, syncs + 1):
        for before in (True, False):
            disk = tmp_path / f"disk-{n}-{'before' if before else 'after'}"
            disk.mkdir()
            with mount(disk) as m:
                m.arm(n, before=before)
                with pytest.raises((OSError, cowstore.Error, sqlite3.Error)):
                    create(m.path / "store")
                assert m.dead
            assert sorted(os.listdir(disk)) in ([], ["store"])
            if (disk / "store").exists():
                with cowstore.open(disk / "store") as s:
                    assert s.check().ok and list(s.walk()) == []
                    assert (s.chunk_size, s.default_size) == (CHUNK, SIZE)
                outcomes["whole store"] += 1
            else:
                outcomes["no store"] += 1
            create(disk / "store")
            with cowstore.open(disk / "store") as s:
                s.prepare("a").pwrite(b"works", 0)
                s.commit("img", "a")
                assert s.view("v", "img").pread(5, 0) == b"works"
            shutil.rmtree(disk)
    print(f"\nstore creation cut before and after each of its {syncs} fsyncs: {dict(outcomes)}")
