"""Raw disk images in and out of a store: sparse-aware streaming with a bounded buffer.

Import reads a file chunk by chunk and writes only what a snapshot needs (holes and zero
chunks cost nothing); export writes only allocated, non-zero chunks and truncates the file
to its size, so both sides stay sparse. Memory use is a few chunks, whatever the image size.
Both are all or nothing: a snapshot or a file appears under its name only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import AlreadyExists, Error, InvalidArgument, NoSpace
from .store import IMPORTING, Store
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
    fd = _open_image(os.fspath(path))
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _open_image(path: str) -> int:
    """A raw image opened for reading: a regular file or a block device, whose size is known."""
    # O_NONBLOCK: opening a fifo must not wait for a writer before it is refused.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise InvalidArgument(f"{path} is {_kind(mode)}, not a raw image (a regular file or a block device)")
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def import_image(
    store: Store,
    path: str | os.PathLike[str],
    key: str,
    *,
    parent: str | None = None,
    labels: dict[str, str] | None = None,
    commit: str | None = None,
    progress: Progress | None = None,
) -> Transfer:
    """Read a raw image into the new active snapshot `key`, of the file's exact size, or with
    `commit`, into the committed snapshot of that name (`key` is then only its working name).

    With `parent`, the snapshot is the parent's child (and has its size, which must be at
    least the file's): the file's bytes replace the parent's from offset 0, chunks equal to
    the parent's stay shared, and bytes past the end of the file keep the parent's contents.

    All or nothing: the bytes go into a snapshot under a temporary key, which takes its name
    only once the import is complete and durable. An error, a full disk or an interruption
    (Ctrl-C, or SIGTERM raised as SystemExit) removes it again; a crash leaves it for the
    next open of the store to remove.
    """
    path = os.fspath(path)
    progress = progress or _ignore
    if commit is not None and commit == key:
        raise InvalidArgument(
            f"the committed name {commit!r} is the key being imported: it needs a name of its own"
        )
    for name in (key, commit):
        if name is not None and store.exists(name):
            raise AlreadyExists(f"snapshot {name!r} already exists")
    fd = _open_image(path)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            raise InvalidArgument(f"{path} is empty: there is nothing to import")
        working = IMPORTING + secrets.token_hex(8)
        if parent is not None:
            parent_size = store.stat(parent).size
            if parent_size < size:
                raise InvalidArgument(
                    f"{path} ({size} bytes) is larger than parent {parent!r} ({parent_size} bytes)"
                )
            vol = store.prepare(working, parent, labels=None if commit else labels)
        else:
            vol = store.prepare(working, size=size, labels=None if commit else labels)
        try:
            with vol:
                result = _copy_in(fd, path, size, vol, store.chunk_size, parent is not None, progress)
                vol.flush()
            if commit is not None:
                store.commit(commit, working, labels=labels)
            else:
                store.rename(working, key)
        except BaseException as exc:
            with contextlib.suppress(Error):
                store.remove(working)
            if isinstance(exc, NoSpace):
                raise NoSpace(f"import of {path}: {exc}") from exc
            raise
        return result
    finally:
        os.close(fd)


def export_volume(
    vol: Volume,
    path: str | os.PathLike[str],
    chunk_size: int,
    *,
    replace: bool = False,
    progress: Progress | None = None,
) -> Transfer:
    """Write the volume to a raw image at `path`; "-" is standard output.

    A regular file is written sparse (unallocated and all-zero chunks are skipped, and the
    file gets the volume's size) under a temporary name beside it, which replaces `path`
    only once it is complete and fsynced: an interrupted export leaves nothing under the
    final name. Anything else (a block device, a pipe) gets every byte in order. An existing
    `path` is refused unless `replace`.
    """
    progress = progress or _ignore
    if os.fspath(path) == "-":
        return _export_to(vol, sys.stdout.fileno(), chunk_size, False, progress)
    path = os.fspath(path)
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not replace:
        raise AlreadyExists(f"{path} exists: replace it only on purpose (--force)")
    if mode is not None and not stat.S_ISREG(mode):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return _export_to(vol, fd, chunk_size, False, progress)
        finally:
            os.close(fd)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.export-{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            result = _export_to(vol, fd, chunk_size, True, progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)
    return result


def _export_to(vol: Volume, fd: int, chunk_size: int, sparse: bool, progress: Progress) -> Transfer:
    """The volume's bytes into `fd`: sparse into a regular file, else every byte in order."""
    result = Transfer(size=vol.size)
    buf = memoryview(bytearray(chunk_size))
    zeros = bytes(chunk_size)
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
                _write_all(fd, piece, off if sparse else None)
                result.written += n
            progress(n)
    if sparse:
        os.ftruncate(fd, vol.size)
    return result


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview, offset: int | None) -> None:
    """All of `view` at `offset`, or at the file position (a pipe, a device) for None."""
    while len(view):
        if offset is None:
            done = os.write(fd, view)
        else:
            done = os.pwrite(fd, view, offset)
            offset += done
        view = view[done:]
