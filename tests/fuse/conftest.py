"""A store mounted with `cowstore.fuse.mount`: the fixtures the FUSE server tests share.

`mounted` is engine-agnostic: its store's engine picks the server (`_cserver` for the Cython
engine, `server` for the pure one); `fuse_engine` says which engines run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import cowstore
import cowstore.fuse
from tests.tools import need

CHUNK = 64 << 10
SIZE = 8 << 20


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

    def path(self, key: str) -> Path:
        return self.mountpoint / cowstore.fuse.file_name(key)

    def remount(self) -> None:
        """Unmount, close the store, reopen and mount again (what survives is durable)."""
        self.mount.close()
        engine = self.store.engine
        self.store.close()
        self.store = cowstore.open(self.directory, engine=engine)
        self.mount = cowstore.fuse.mount(self.store, str(self.mountpoint))


@pytest.fixture(params=["cython"])
def fuse_engine(request: pytest.FixtureRequest) -> str:
    """The engines whose FUSE server runs (the Cython one: `_cserver`)."""
    missing = _fuse_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return request.param


@pytest.fixture
def mounted(fuse_engine: str, tmp_path: Path) -> Iterator[Mounted]:
    """An on-disk store (64 KiB chunks, 8 MiB snapshots) with an active snapshot `rw`, mounted."""
    directory = tmp_path / "store"
    store = cowstore.open(directory, create=True, chunk_size=CHUNK, default_size=SIZE, engine=fuse_engine)
    store.prepare("rw")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = Mounted(store, mountpoint, cowstore.fuse.mount(store, str(mountpoint)), directory)
    try:
        yield m
    finally:
        m.mount.close()
        m.store.close()


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
