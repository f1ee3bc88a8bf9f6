"""Volumes: open handles to one snapshot's bytes, and a file object over them."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from .errors import Closed, Corruption, InvalidArgument, NoSpace, NotFound, ReadOnly
from .types import Extent, Kind

if TYPE_CHECKING:
    from .store import Store, _Snapshot

MAX_IO = 1 << 30


class Volume:
    """A handle to an active (read-write) or view (read-only) snapshot.

    Offsets and lengths are bytes and need not be aligned. Thread-safe.
    """

    __slots__ = ("_engine", "_id", "_snapshot", "_store", "closed", "key", "readonly", "size")

    def __init__(self, store: Store, snapshot: _Snapshot, *, readonly: bool = False) -> None:
        self._store = store
        self._snapshot = snapshot
        self._engine = store._engine
        self._id = snapshot.id
        self.key: str = snapshot.key
        self.size: int = snapshot.size
        self.readonly: bool = readonly or snapshot.kind is not Kind.ACTIVE
        self.closed = False

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<cowstore.Volume {self.key!r} size={self.size} {mode}>"

    def _check(self, offset: int, length: int, max_length: int = MAX_IO) -> None:
        if self.closed:
            raise Closed(f"volume {self.key!r} is closed")
        if self._snapshot.dead:
            raise NotFound(f"snapshot {self.key!r} was committed or removed")
        if not isinstance(offset, int) or not isinstance(length, int):
            raise InvalidArgument("offset and length must be ints")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range {offset}+{length} is outside the volume of {self.size} bytes")
        if length > max_length:
            raise InvalidArgument(f"length {length} is over the maximum of {max_length} bytes per call")

    def _check_writable(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.readonly:
            raise ReadOnly(f"snapshot {self.key!r} is read-only here: it cannot be written")

    def _gone(self) -> NotFound:
        return NotFound(f"snapshot {self.key!r} was committed or removed")

    def _damaged(self, exc: Corruption, offset: int, length: int) -> Corruption:
        return Corruption(f"snapshot {self.key!r}, read of {length} bytes at offset {offset}: {exc}")

    def pread(self, length: int, offset: int) -> bytes:
        """`length` bytes from `offset`."""
        self._check(offset, length)
        try:
            return self._engine.pread(self._id, length, offset)
        except KeyError:
            raise self._gone() from None
        except Corruption as exc:
            raise self._damaged(exc, offset, length) from exc

    def preadinto(self, buffer, offset: int) -> int:
        """Fill `buffer` (any writable buffer) from `offset`; returns its length in bytes."""
        try:
            view = memoryview(buffer)
        except TypeError:
            raise InvalidArgument(f"preadinto needs a writable buffer, not {type(buffer).__name__}") from None
        if view.readonly:
            raise InvalidArgument("preadinto needs a writable buffer")
        self._check(offset, view.nbytes)
        try:
            self._engine.read(self._id, view, offset)
        except KeyError:
            raise self._gone() from None
        except Corruption as exc:
            raise self._damaged(exc, offset, view.nbytes) from exc
        return view.nbytes

    def pwrite(self, data, offset: int) -> int:
        """Write `data` (any buffer) at `offset`; returns its length in bytes."""
        try:
            view = memoryview(data)
        except TypeError:
            raise InvalidArgument(f"pwrite needs a bytes-like object, not {type(data).__name__}") from None
        self._check_writable(offset, view.nbytes)
        self._retry_on_full(self._engine.write, view, offset)
        return view.nbytes

    def discard(self, offset: int, length: int) -> None:
        """Drop a range: it reads as zeros and whole chunks in it stop using space."""
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros without allocating space for them."""
        self._check_writable(offset, length)
        self._retry_on_full(self._engine.zero, offset, length)

    def _retry_on_full(self, call, *args) -> None:
        """Run an engine write; when the pool is full, make pending frees durable and retry once."""
        try:
            try:
                call(self._id, *args)
            except NoSpace:
                if not self._store._reclaim():
                    raise
                call(self._id, *args)
        except KeyError:
            raise self._gone() from None

    def flush(self) -> None:
        """Make every write before this call durable (flushes the whole store)."""
        self._check(0, 0)
        self._store.flush()

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Extents of the range with allocation, zero and depth (0 none, 1 this snapshot, …)."""
        if length is None:
            length = self.size - offset if isinstance(offset, int) else 0
        self._check(offset, length, max_length=self.size)
        try:
            return self._store._extents(self._snapshot, offset, length)
        except KeyError:
            raise self._gone() from None

    def file(self) -> VolumeFile:
        """A seekable file object over the volume."""
        return VolumeFile(self)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VolumeFile(io.RawIOBase):
    """`io.RawIOBase` over a volume: for code that wants a file (shutil, tarfile, hashing)."""

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        self._volume = volume
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._volume.readonly

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._volume.size}.get(whence)
        if base is None:
            raise InvalidArgument(f"invalid whence {whence}")
        if base + offset < 0:
            raise InvalidArgument(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._volume.size - self._pos))
        if n:
            self._volume.preadinto(view[:n], self._pos)
            self._pos += n
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self._pos + n > self._volume.size:
            raise InvalidArgument(f"write of {n} bytes at {self._pos} goes past the end of the volume")
        self._volume.pwrite(view, self._pos)
        self._pos += n
        return n

    def flush(self) -> None:
        super().flush()
        if not self.closed and not self._volume.readonly:
            self._volume.flush()
