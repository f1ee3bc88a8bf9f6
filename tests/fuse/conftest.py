"""A store mounted with `cowstore.fuse.mount`: the fixtures the FUSE tests share.

`mounted` runs once per engine (the suite-wide `engine` fixture), and the store's engine
picks the server: `_cserver` (Cython, over libfuse) for the Cython engine, `server` (pure
Python, on /dev/fuse) for the pure one; so every test of the mount holds for both servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cowstore
import cowstore.fuse
from cowstore.fuse import kernel
from tests.data import pattern
from tests.tools import need

CHUNK = 64 << 10
SIZE = 16 << 20
KEYS = ("default/1/sha256:base", "rw layer", "view: of base")
"""The fixture's snapshots: committed, active on it, and a view of it."""
BASE = pattern(3 * CHUNK, 1)
"""The committed base's bytes: its first three chunks (the rest reads as zeroes)."""
WATCHDOG = 120
"""Seconds a test may take before the fixture aborts its mount's connection, so that a hung
server fails the test instead of hanging the run."""


def _fuse_missing() -> str | None:
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


@dataclass
class Mounted:
    """A store, its mount point, and how to reach a snapshot's file."""

    store: cowstore.Store
    mountpoint: Path
    mount: cowstore.fuse.Mount
    directory: Path
    engine: str
    hung: threading.Event = field(default_factory=threading.Event)

    def path(self, key: str) -> Path:
        return self.mountpoint / cowstore.fuse.file_name(key)

    def remount(self) -> None:
        """Unmount, close the store, reopen and mount again (what survives is durable)."""
        self.mount.close()
        self.store.close()
        self.store = cowstore.open(self.directory, engine=self.engine)
        self.mount = cowstore.fuse.mount(self.store, str(self.mountpoint))


@pytest.fixture
def mounted(engine: str, tmp_path: Path) -> Iterator[Mounted]:
    """An on-disk store (64 KiB chunks, 16 MiB snapshots) with `KEYS`, mounted: a committed
    base holding `BASE`, an active snapshot on it and a view of it. Unmounted and closed at
    the end, and no mount is left; a test still running after `WATCHDOG` seconds has its
    connection aborted (its system calls fail) and fails."""
    missing = _fuse_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    directory = tmp_path / "store"
    store = cowstore.open(directory, create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine)
    base, active, view = KEYS
    with store.prepare("base-tmp") as v:
        v.pwrite(BASE, 0)
    store.commit(base, "base-tmp")
    store.prepare(active, base).close()
    store.view(view, base).close()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = Mounted(store, mountpoint, cowstore.fuse.mount(store, str(mountpoint)), directory, engine)

    def abort() -> None:
        m.hung.set()
        conn = kernel.connection(str(mountpoint))
        if conn is not None:
            kernel.abort(conn)

    watchdog = threading.Timer(WATCHDOG, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield m
    finally:
        watchdog.cancel()
        try:
            m.mount.close()
        finally:
            m.store.close()
    assert not kernel.is_mounted(str(mountpoint)), "the mount outlived its fixture"
    if m.hung.is_set():
        pytest.fail(f"the mount hung: its connection was aborted after {WATCHDOG} s")


@pytest.fixture
def run_concurrently() -> Callable[..., None]:
    """Runs callables in threads; re-raises the first failure."""
    import threading

    def run(*tasks: Callable[[], None]) -> None:
        errors: list[BaseException] = []

        def wrap(task: Callable[[], None]) -> None:
            try:
                task()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=wrap, args=(t,)) for t in tasks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    return run


@contextlib.contextmanager
def loop_mounted(image: Path, where: Path, *options: str) -> Iterator[Path]:
    """`image` (an ext4 in a snapshot's file) mounted through a loop device at `where`."""
    need("mount", "umount")
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", ",".join(["loop", *options]), str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
