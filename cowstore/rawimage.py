"""Raw disk images in and out of a store: sparse-aware streaming with a bounded buffer.

Import reads a file chunk by chunk and writes only what a snapshot needs (holes and zero
chunks cost nothing); export writes only allocated, non-zero chunks and truncates the file
to its size, so both sides stay sparse. Memory use is a few chunks, whatever the image size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import Error, InvalidArgument
from .store import Store
from .types import Extent
from .volume import Volume

Progress = Callable[[int], None]
"""Told how many more bytes of the image were dealt with (copied, zeroed or skipped)."""

WINDOW_CHUNKS = 4096


@dataclass
class Transfer:
    """What an import or export did with the image's bytes; the three add up to `size`."""

    size: int = 0
    written: int = 0
    zeroed: int = 0
    skipped: int = 0


def _ignore(_: int) -> None:
    return None


@contextlib.contextmanager
def snapshot_volume(store: Store, key: str) -> Iterator[Volume]:
    """A read-only volume on any snapshot, committed ones too."""
    with store.reader(key) as vol:
        yield vol


def extents(block_status: Callable[[int, int], list[Extent]], size: int, chunk_size: int) -> Iterator[Extent]:
    """Extents of [0, size) in order, asked of `block_status(offset, length)` a window at a time.

    Windows keep memory bounded on big, fragmented snapshots; runs split by a window
    boundary are merged again.
    """
    window = chunk_size * WINDOW_CHUNKS
    pending: Extent | None = None
    for start in range(0, size, window):
        for ext in block_status(start, min(window, size - start)):
            if (
                pending is not None
                and (pending.allocated, pending.zero, pending.depth) == (ext.allocated, ext.zero, ext.depth)
                and pending.offset + pending.length == ext.offset
            ):
                pending = Extent(
                    pending.offset, pending.length + ext.length, ext.allocated, ext.zero, ext.depth
                )
                continue
            if pending is not None:
                yield pending
            pending = ext
    if pending is not None:
        yield pending


def _pieces(start: int, end: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of [start, end) that never cross a chunk boundary."""
    off = start
    while off < end:
        n = min(chunk_size - off % chunk_size, end - off)
        yield off, n
        off += n


def _is_zero(view: memoryview, zeros: bytes) -> bool:
    return view.tobytes() == zeros[: len(view)]


def _read_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InvalidArgument(f"{path} shrank while it was being read (short read at {offset + done})")
        done += got


def data_ranges(fd: int, size: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Ranges of the file that may hold data, widened to chunk boundaries and clipped to `size`.

    Holes found with SEEK_DATA/SEEK_HOLE are skipped; without them the whole file is data.
    """
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    pos = 0
    while pos < size:
        if seek_data is None or seek_hole is None:
            yield pos, size
            return
        try:
            start = os.lseek(fd, pos, seek_data)
            end = os.lseek(fd, start, seek_hole)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY, errno.ESPIPE):
                yield pos, size
                return
            raise
        if start >= size:
            return
        start = max(pos, start - start % chunk_size)
        end = min(size, -(-end // chunk_size) * chunk_size)
        yield start, end
        pos = end


def _zero_over(vol: Volume, offset: int, length: int, chunk_size: int) -> int:
    """Make [offset, offset+length) read as zeros where it does not already; bytes zeroed."""
    zeroed = 0
    window = chunk_size * WINDOW_CHUNKS
    for start in range(offset, offset + length, window):
        for ext in vol.block_status(start, min(window, offset + length - start)):
            if not ext.zero:
                vol.write_zeroes(ext.offset, ext.length)
                zeroed += ext.length
    return zeroed


def _copy_in(
    fd: int, path: str, size: int, vol: Volume, chunk_size: int, layered: bool, progress: Progress
) -> Transfer:
    """Copy the file's first `size` bytes into `vol`, writing only what changes its contents."""
    result = Transfer(size=size)
    buf = memoryview(bytearray(chunk_size))
    current = memoryview(bytearray(chunk_size)) if layered else None
    zeros = bytes(chunk_size)

    def hole(start: int, end: int) -> None:
        zeroed = _zero_over(vol, start, end - start, chunk_size) if layered else 0
        result.zeroed += zeroed
        result.skipped += end - start - zeroed
        progress(end - start)

    pos = 0
    for start, end in data_ranges(fd, size, chunk_size):
        if start > pos:
            hole(pos, start)
        for off, n in _pieces(start, end, chunk_size):
            piece = buf[:n]
            _read_exact(fd, piece, off, path)
            if current is not None:
                vol.preadinto(current[:n], off)
                if piece.tobytes() == current[:n].tobytes():
                    result.skipped += n
                elif _is_zero(piece, zeros):
                    vol.write_zeroes(off, n)
                    result.zeroed += n
                else:
                    vol.pwrite(piece, off)
                    result.written += n
            elif _is_zero(piece, zeros):
                result.skipped += n
            else:
                vol.pwrite(piece, off)
                result.written += n
            progress(n)
        pos = end
    if pos < size:
        hole(pos, size)
    return result


def image_size(path: str | os.PathLike[str]) -> int:
    """The size of a file or block device, in bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def import_image(
    store: Store,
    path: str | os.PathLike[str],
    key: str,
    *,
    parent: str | None = None,
    labels: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> Transfer:
    """Read a raw image into the new active snapshot `key`, of the file's exact size.

    With `parent`, `key` is the parent's child (and has its size, which must be at least the
    file's): the file's bytes replace the parent's from offset 0, chunks equal to the
    parent's stay shared, and bytes past the end of the file keep the parent's contents.
    If anything fails, `key` is removed again.
    """
    path = os.fspath(path)
    progress = progress or _ignore
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            raise InvalidArgument(f"{path} is empty: there is nothing to import")
        if parent is not None:
            parent_size = store.stat(parent).size
            if parent_size < size:
                raise InvalidArgument(
                    f"{path} ({size} bytes) is larger than parent {parent!r} ({parent_size} bytes)"
                )
            vol = store.prepare(key, parent, labels=labels)
        else:
            vol = store.prepare(key, size=size, labels=labels)
        try:
            with vol:
                result = _copy_in(fd, path, size, vol, store.chunk_size, parent is not None, progress)
                vol.flush()
        except BaseException:
            with contextlib.suppress(Error):
                store.remove(key)
            raise
        return result
    finally:
        os.close(fd)


def export_volume(
    vol: Volume, path: str | os.PathLike[str], chunk_size: int, *, progress: Progress | None = None
) -> Transfer:
    """Write the volume to a raw image at `path`, replacing it.

    A regular file is written sparse: unallocated and all-zero chunks are skipped and the
    file is truncated to the volume's size. Anything else (a block device) gets every byte.
    """
    progress = progress or _ignore
    result = Transfer(size=vol.size)
    buf = memoryview(bytearray(chunk_size))
    zeros = bytes(chunk_size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        sparse = stat.S_ISREG(os.fstat(fd).st_mode)
        for ext in extents(vol.block_status, vol.size, chunk_size):
            if sparse and ext.zero:
                result.skipped += ext.length
                progress(ext.length)
                continue
            for off, n in _pieces(ext.offset, ext.offset + ext.length, chunk_size):
                if ext.zero:
                    piece = memoryview(zeros)[:n]
                else:
                    piece = buf[:n]
                    vol.preadinto(piece, off)
                if sparse and _is_zero(piece, zeros):
                    result.skipped += n
                else:
                    _write_all(fd, piece, off)
                    result.written += n
                progress(n)
        if sparse:
            os.ftruncate(fd, vol.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return result


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done
