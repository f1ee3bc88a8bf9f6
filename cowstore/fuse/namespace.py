"""What a mount shows: one regular file per snapshot, directly in the mount point.

This is the policy both servers share (the Cython one calls it for everything but reads
and writes; the pure-Python one for everything): names, inode numbers, attributes,
who may open what, and the calls that are not hot (fsync, lseek, fallocate, statfs).
Each method raises `OSError` with the errno the kernel should see, or a cowstore error
that `errno_of` translates.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import quote, unquote

from .. import errors
from ..types import Kind

if TYPE_CHECKING:
    from ..store import Store, _Snapshot
    from ..volume import Volume

ROOT = 1
"""The mount point's inode; a snapshot's is its map id plus `FIRST`."""
FIRST = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SEEK_DATA = 3
SEEK_HOLE = 4


class Attr(NamedTuple):
    """An inode's attributes as the kernel gets them (st_blocks in 512-byte units)."""

    ino: int
    mode: int
    nlink: int
    size: int
    blocks: int
    mtime_ns: int
    uid: int
    gid: int


def file_name(key: str) -> str:
    """The file name of snapshot `key`: keys hold `/`, spaces and `:`."""
    return quote(key, safe="")


def snapshot_key(name: str) -> str | None:
    """The key whose file is `name`, None if `name` is not the name of any key."""
    key = unquote(name, errors="strict")
    return key if file_name(key) == name else None


def errno_of(exc: BaseException) -> int:
    """The errno that reports `exc` to the kernel."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, errors.NotFound):
        return errno.ESTALE
    if isinstance(exc, errors.ReadOnly):
        return errno.EROFS
    if isinstance(exc, errors.NoSpace):
        return errno.ENOSPC
    if isinstance(exc, errors.InvalidArgument):
        return errno.EINVAL
    if isinstance(exc, (errors.Closed, errors.Unavailable)):
        return errno.EIO
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO


def _error(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


class Namespace:
    """The directory of one store's snapshots, as the kernel sees it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._uid = os.geteuid()
        self._gid = os.getegid()
        self._keys: dict[int, str] = {}
        self._mutex = threading.Lock()
        self.started_ns = time.time_ns()

    # -- names and attributes ------------------------------------------------

    def root(self) -> Attr:
        return Attr(ROOT, stat.S_IFDIR | 0o555, 2, 0, 0, self.started_ns, self._uid, self._gid)

    def lookup(self, parent: int, name: bytes) -> Attr:
        """The file `name` in the directory `parent` (only the mount point is one)."""
        if parent != ROOT:
            raise _error(errno.ENOTDIR, f"inode {parent} is not a directory")
        try:
            key = snapshot_key(name.decode())
        except UnicodeDecodeError:
            key = None
        s = None if key is None else self._find(key)
        if s is None:
            raise _error(errno.ENOENT, f"no snapshot has the file name {name!r}")
        return self._attr(s)

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT:
            return self.root()
        return self._attr(self._snapshot(ino))

    def listdir(self) -> list[tuple[bytes, Attr]]:
        """Every snapshot's file name and attributes, in key order."""
        with self.store._lock:
            self.store._check_open()
            found = sorted(self.store._snapshots.items())
        return [(file_name(key).encode(), self._attr(s)) for key, s in found]

    def _find(self, key: str) -> _Snapshot | None:
        with self.store._lock:
            self.store._check_open()
            s = self.store._snapshots.get(key)
        if s is not None:
            with self._mutex:
                self._keys[s.id + FIRST] = key
        return s

    def _snapshot(self, ino: int) -> _Snapshot:
        """The snapshot of inode `ino`: ENOENT once it was committed, removed or renamed away."""
        with self._mutex:
            key = self._keys.get(ino)
        s = None if key is None else self._find(key)
        if s is None or s.id + FIRST != ino:
            with self.store._lock:
                s = next((s for s in self.store._snapshots.values() if s.id + FIRST == ino), None)
            if s is None:
                raise _error(errno.ENOENT, f"inode {ino}: its snapshot was committed or removed")
            with self._mutex:
                self._keys[ino] = s.key
        return s

    def _attr(self, s: _Snapshot) -> Attr:
        mode = 0o644 if s.kind is Kind.ACTIVE and not self.store.readonly else 0o444
        return Attr(
            s.id + FIRST,
            stat.S_IFREG | mode,
            1,
            s.size,
            self._allocated(s) // 512,
            s.updated * 1000,
            self._uid,
            self._gid,
        )

    def _allocated(self, s: _Snapshot) -> int:
        """Bytes of the chunks the snapshot's map names (its own and those it shares), as
        SEEK_DATA finds them: a count over the map's pages, not a walk of its chunks."""
        try:
            chunks = self.store._engine.exclusive_chunks(s.id, None)
        except (KeyError, errors.Error):
            return 0
        return min(chunks * self.store.chunk_size, s.size)

    def setattr(
        self,
        ino: int,
        size: int | None,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Attr:
        """Only changes to what the file has are allowed (tools truncate to its size, or
        chmod and chown to its mode and owner); times are accepted and not kept. `None`
        leaves a field alone; `mode` is compared by its permission bits."""
        attr = self.getattr(ino)
        if (
            ino == ROOT
            or (size is not None and size != attr.size)
            or (mode is not None and stat.S_IMODE(mode) != stat.S_IMODE(attr.mode))
            or (uid is not None and uid != attr.uid)
            or (gid is not None and gid != attr.gid)
        ):
            raise _error(errno.EPERM, "a snapshot's file cannot change size, mode or owner")
        return attr

    # -- open files ----------------------------------------------------------

    def open(self, ino: int, flags: int) -> Volume:
        """A volume on the snapshot of `ino`: active ones read-write, the others read-only."""
        if ino == ROOT:
            raise _error(errno.EISDIR, "the mount point is a directory")
        s = self._snapshot(ino)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_TRUNC:
            raise _error(errno.EPERM, f"snapshot {s.key!r} cannot be truncated")
        if write and (s.kind is not Kind.ACTIVE or self.store.readonly):
            raise _error(errno.EROFS, f"snapshot {s.key!r} is {s.kind.value}: read-only")
        if s.kind is Kind.COMMITTED:
            return self.store.reader(s.key)
        return self.store.mounts(s.key)

    def fsync(self, volume: Volume) -> None:
        """Make every write before this call durable."""
        if not volume.readonly:
            volume.flush()

    def seek(self, volume: Volume, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE, following `block_status`; ENXIO at or past the end."""
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise _error(errno.EINVAL, f"whence {whence}")
        if offset < 0:
            raise _error(errno.EINVAL, f"offset {offset}")
        if offset >= volume.size:
            raise _error(errno.ENXIO, f"offset {offset} is at or past the end ({volume.size})")
        for e in volume.block_status(offset):
            if e.allocated == (whence == SEEK_DATA):
                return max(e.offset, offset)
        if whence == SEEK_HOLE:
            return volume.size
        raise _error(errno.ENXIO, f"no data at or after {offset}")

    def allocate(self, volume: Volume, mode: int, offset: int, length: int) -> None:
        """fallocate: PUNCH_HOLE (with KEEP_SIZE) discards, ZERO_RANGE writes zeroes;
        reserving space (mode 0) is not something a snapshot can promise."""
        if volume.readonly:
            raise _error(errno.EROFS, f"snapshot {volume.key!r} is read-only")
        if offset < 0 or length <= 0:
            raise _error(errno.EINVAL, f"range {offset}+{length}")
        keep = mode & FALLOC_FL_KEEP_SIZE
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        punch = kind == FALLOC_FL_PUNCH_HOLE
        if not (punch and keep) and kind != FALLOC_FL_ZERO_RANGE:
            raise _error(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        end = offset + length
        if end > volume.size:
            if not keep:
                raise _error(errno.EFBIG, f"a snapshot's file cannot grow past {volume.size} bytes")
            end = volume.size
        if offset >= end:
            return
        if punch:
            volume.discard(offset, end - offset)
        else:
            volume.write_zeroes(offset, end - offset)

    def statfs(self) -> tuple[int, int, int, int, int, int, int]:
        """(bsize, blocks, bfree, bavail, files, ffree, namemax) in chunks of the pool."""
        st = self.store.stats()
        disk = os.fstatvfs(self.store._data_fd)
        free_disk = disk.f_bavail * disk.f_frsize // st.chunk_size
        cap = st.max_bytes // st.chunk_size if st.max_bytes else st.slots + free_disk
        free = max(0, cap - st.used)
        return (st.chunk_size, max(cap, st.used), free, free, st.snapshots, 0, 255)
