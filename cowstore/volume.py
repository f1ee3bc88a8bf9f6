"""Volumes: open handles to one snapshot's bytes, and a file object over them."""

from __future__ import annotations

import io
from types import ModuleType
from typing import TYPE_CHECKING

from .engines import ENGINES
from .engines import python as _python
from .errors import Closed, InvalidArgument, NotFound
from .types import Extent, Kind

if TYPE_CHECKING:
    from .store import Store, _Snapshot

    # The I/O interface (pread, pwrite, key, size, ...) is declared once, by the pure
    # engine's VolumeBase; at run time each engine's subclass below brings its own.
    _VolumeBase = _python.VolumeBase
else:
    _VolumeBase = object


class Volume(_VolumeBase):
    """A handle to an active (read-write) or view (read-only) snapshot.

    Offsets and lengths are bytes and need not be aligned. Thread-safe. The hot methods
    (`pread`, `preadinto`, `pwrite`, `write_zeroes`, `close`) and the attributes `key`,
    `size`, `readonly` and `closed` come from the engine's `VolumeBase`, so that with the
    Cython engine a call goes straight to C; this class holds the rest. Each engine has
    its own subclass, `PythonVolume` and `CythonVolume` (`volume_class` picks it); both are
    instances of this one.
    """

    if not TYPE_CHECKING:
        # No instance layout of its own, so that it combines with the C base class; the
        # subclasses below hold `_store` and `_snapshot`.
        __slots__ = ()

    _store: Store
    _snapshot: _Snapshot

    def __init__(self, store: Store, snapshot: _Snapshot, *, readonly: bool = False) -> None:
        self._store = store
        self._snapshot = snapshot
        readonly = readonly or snapshot.kind is not Kind.ACTIVE
        self._attach(store._engine, snapshot.id, snapshot.key, snapshot.size, readonly)

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<cowstore.Volume {self.key!r} size={self.size} {mode}>"

    def _reclaim(self) -> bool:
        """Make pending frees durable when the pool is full, so the write retries once."""
        return self._store._reclaim()

    def _check(self, offset: int, length: int, max_length: int) -> None:
        self._check_range(offset, length, max_length)
        if self._snapshot.dead:
            raise NotFound(f"snapshot {self.key!r} was committed or removed")

    def discard(self, offset: int, length: int) -> None:
        """Drop a range: it reads as zeros and whole chunks in it stop using space."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        """Make every write before this call durable (flushes the whole store)."""
        self._check(0, 0, 0)
        self._store.flush()

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Extents of the range with allocation, zero and depth (0 none, 1 this snapshot, …)."""
        if length is None:
            length = self.size - offset if isinstance(offset, int) else 0
        self._check(offset, length, self.size)
        try:
            return self._store._extents(self._snapshot, offset, length)
        except KeyError:
            raise NotFound(f"snapshot {self.key!r} was committed or removed") from None

    def file(self) -> VolumeFile:
        """A seekable file object over the volume."""
        return VolumeFile(self)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PythonVolume(Volume, _python.VolumeBase):
    """A `Volume` of the pure-Python engine."""

    __slots__ = ("_snapshot", "_store")


_classes: dict[ModuleType, type[Volume]] = {_python: PythonVolume}

if "cython" in ENGINES:
    from .engines._cengine import VolumeBase as _CythonVolumeBase

    class CythonVolume(Volume, _CythonVolumeBase):
        """A `Volume` of the Cython engine: its I/O methods are C."""

        __slots__ = ("_snapshot", "_store")

    _classes[ENGINES["cython"]] = CythonVolume


def volume_class(engine_module: ModuleType) -> type[Volume]:
    """The `Volume` subclass whose hot half is `engine_module.VolumeBase`."""
    return _classes[engine_module]


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

    def _check_open(self) -> None:
        if self.closed:
            raise Closed(f"the file of volume {self._volume.key!r} is closed")

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._volume.size}.get(whence)
        if base is None:
            raise InvalidArgument(f"invalid whence {whence}")
        if base + offset < 0:
            raise InvalidArgument(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._volume.size - self._pos))
        if n:
            self._volume.preadinto(view[:n], self._pos)
            self._pos += n
        return n

    def write(self, data) -> int:
        self._check_open()
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
