"""A store's directory: its files, its lock, its atomic creation (`build`); and the entry points that open
a store in a directory (`open`) or in memory (`memory`).

The directory holds `data` (the chunk pool), `meta.sqlite` (snapshots and map pages) and `lock`
(flocked by the one process that has the store open, which writes its pid there).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

from . import metadata
from .errors import Corruption, InvalidArgument, Locked, NotFound
from .store import Store, initial_settings, stored_settings

DATA_FILE = "data"
META_FILE = "meta.sqlite"
LOCK_FILE = "lock"


class Backing(NamedTuple):
    """What a `Store` runs on: its metadata, its data file and, in a directory, its lock.

    The store owns these once made and closes them; `durable` says whether it must fsync.
    """

    where: str
    meta: metadata.Metadata
    data_fd: int
    lock_fd: int | None
    durable: bool


def lock(path: Path, *, wait: float = 0.0, shared: bool = False) -> int:
    """Take the store's lock, waiting up to `wait` seconds for a holder to let go: exclusive,
    with our pid in the lock file, or `shared` for a read-only open. `Locked` names the holder."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = _holder(fd)
            os.close(fd)
            raise Locked(
                f"store {path} is in use: process {holder} holds the lock on {path / LOCK_FILE}"
            ) from None
    if not shared:
        # One write of a fixed width, never a truncate: a reader sees the old pid or ours.
        os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """The pid in the lock file of the process that holds it, once it has written it."""
    for _ in range(10):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit() and _alive(int(text)):
            return text
        time.sleep(0.02)
    return "unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build(path: Path, settings: dict[str, int]) -> bool:
    """Build a store in a temporary directory beside `path`, then rename it into place;
    false if another process put one there first."""
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        os.close(os.open(tmp / DATA_FILE, os.O_CREAT | os.O_WRONLY, 0o644))
        meta = metadata.Metadata(str(tmp / META_FILE))
        meta.create(settings)
        meta.close()
        for name in (DATA_FILE, META_FILE):
            fd = os.open(tmp / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if (path / META_FILE).exists():
                return False
            raise InvalidArgument(
                f"{path} exists and is not an empty directory or a cowstore store"
            ) from None
        _fsync_dir(path.parent)
        return True
    finally:
        if tmp.exists():
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()


def is_store(path: Path) -> bool:
    """Whether `path` holds a store (its metadata file)."""
    return (path / META_FILE).exists()


def open(
    path: str | os.PathLike[str],
    *,
    create: bool = False,
    chunk_size: int | None = None,
    default_size: int | None = None,
    max_bytes: int | None = None,
    verify_reads: bool = False,
    engine: str | None = None,
    readonly: bool = False,
    wait: float = 0.0,
) -> Store:
    """Open the store at `path`; with `create=True`, create it first if it is missing.

    `max_bytes` limits the pool (kept in the store until changed); `verify_reads` checks the
    checksum of every committed chunk read; `wait` is how long to wait for another process
    to let go of the store. `readonly` opens a store, a damaged one too, without changing
    anything: the snapshots whose maps are intact read as usual, the damaged ones are
    refused by name, and `check` reports every problem it sees.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"path must be a str or path, not {type(path).__name__}")
    path = Path(path).absolute()
    if readonly and (create or max_bytes is not None):
        raise InvalidArgument("a read-only open cannot create a store or change its limit")
    wanted = initial_settings(chunk_size, default_size)
    created = False
    if not is_store(path):
        if not create:
            if path.is_dir() and any(path.iterdir()):
                raise InvalidArgument(f"{path} is not a cowstore store (no {META_FILE})")
            raise NotFound(f"no store at {path} (pass create=True to make one)")
        if not path.parent.is_dir():
            raise NotFound(f"cannot create a store at {path}: {path.parent} does not exist")
        created = build(path, wanted)
    lock_fd = lock(path, wait=wait, shared=readonly)
    try:
        meta = metadata.Metadata(str(path / META_FILE), readonly=readonly)
        try:
            stored = stored_settings(meta.settings(str(path)), str(path))
            for name, value in (("chunk_size", chunk_size), ("default_size", default_size)):
                if value is not None and value != stored.get(name):
                    raise InvalidArgument(
                        f"{name}={value} differs from the store's {name}={stored.get(name)}, "
                        "fixed at creation"
                    )
            try:
                data_fd = os.open(path / DATA_FILE, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
            except FileNotFoundError:
                raise Corruption(f"{path}: the data file {DATA_FILE} is missing") from None
            try:
                backing = Backing(str(path), meta, data_fd, lock_fd, durable=True)
                store = Store(backing, stored, engine=engine, verify_reads=verify_reads, readonly=readonly)
            except BaseException:
                os.close(data_fd)
                raise
        except BaseException:
            meta.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    # The store owns its files from here on.
    store.created = created
    if max_bytes is not None:
        try:
            store.set_max_bytes(max_bytes)
        except BaseException:
            store.close()
            raise
    return store


def memory(
    *,
    chunk_size: int | None = None,
    default_size: int | None = None,
    max_bytes: int | None = None,
    verify_reads: bool = False,
    engine: str | None = None,
) -> Store:
    """A store held in memory (a memfd and an in-memory SQLite): for tests and scratch work."""
    settings = initial_settings(chunk_size, default_size)
    if max_bytes is not None:
        settings["max_bytes"] = max_bytes
    meta = metadata.Metadata(":memory:")
    meta.create(settings)
    data_fd = os.memfd_create("cowstore", os.MFD_CLOEXEC)
    backing = Backing(":memory:", meta, data_fd, None, durable=False)
    store = Store(backing, settings, engine=engine, verify_reads=verify_reads)
    store.created = True
    return store
