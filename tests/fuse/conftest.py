"""A store mounted with `cowstore.fuse`, once per engine (each engine has its own server)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import cowstore
from cowstore import fuse
from tests.tools import need

CHUNK = 64 << 10
SIZE = 64 << 20


@dataclass
class Mounted:
    """A store, its mount and the mount point."""

    store: cowstore.Store
    mount: fuse.Mount
    path: Path

    def file(self, key: str) -> Path:
        return self.path / fuse.file_name(key)


@pytest.fixture
def mounted(engine: str, tmp_path: Path) -> Iterator[Mounted]:
    need("fusermount3")
    store = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        m = fuse.mount(store, str(mountpoint))
        try:
            yield Mounted(store, m, mountpoint)
        finally:
            m.close()
    finally:
        store.close()


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
