"""The FUSE server of the pure-Python engine: the kernel's protocol spoken on /dev/fuse.

No libfuse: `threads` workers share the one descriptor. Each reads a whole request into
its own buffer (a read returns exactly one request), handles it, and answers with one
`writev`, so a request and its reply are never split between threads. READ replies are
filled in place in the worker's reply buffer and WRITE data is handed to the volume as a
view of the request buffer: a 1 MiB request is copied only by the kernel and the engine.

Caching: a committed snapshot or a view never changes (a commit makes a new inode), so
its file keeps the page cache across opens; an active snapshot's file is direct I/O, as
the store API and other front ends write it too, and a loop device over it then caches
nothing twice. Names are never cached (snapshots come and go), attributes for a second.

Every decision that is not protocol (names, attributes, who may open what, fsync, lseek,
fallocate, statfs) is the `Namespace`'s, which the Cython server asks too. The process
that runs the server must not touch a mapping of a file it serves: the page fault would
wait for a worker that needs the GIL (or the faulting thread's mmap lock) to answer it.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import errors
from . import proto
from .namespace import Attr, Namespace, errno_of

if TYPE_CHECKING:
    from ..volume import Volume

log = logging.getLogger("cowstore.fuse")

ENTRY_VALID = 0
"""Seconds the kernel may trust a name: none, as snapshots appear and go at any time."""
ATTR_VALID = 1
"""Seconds the kernel may trust attributes (sizes never change; usage does)."""
BLKSIZE = 4096
"""st_blksize: the page size, which block tools and the loop driver expect."""
MAX_BACKGROUND = 16
"""Asynchronous requests (readahead, async direct I/O) the kernel keeps in flight."""
HEADER_ROOM = 4096
"""Bytes of a request buffer beyond `max_write`: headers, and names for LOOKUP."""
PR_SET_IO_FLUSHER = 57

Reply = bytes | bytearray | memoryview | None

WANTED = (
    proto.ASYNC_READ
    | proto.ATOMIC_O_TRUNC
    | proto.BIG_WRITES
    | proto.DO_READDIRPLUS
    | proto.READDIRPLUS_AUTO
    | proto.ASYNC_DIO
    | proto.PARALLEL_DIROPS
    | proto.MAX_PAGES
    | proto.DIRECT_IO_ALLOW_MMAP
)
"""INIT flags asked for when the kernel offers them. Not AUTO_INVAL_DATA nor the writeback
cache: writes go straight to the store, and only files whose bytes never change are
cached. DIRECT_IO_ALLOW_MMAP lets an active snapshot's direct-I/O file be mapped shared."""

REFUSED = frozenset(
    {
        proto.CREATE,
        proto.MKNOD,
        proto.MKDIR,
        proto.UNLINK,
        proto.RMDIR,
        proto.RENAME,
        proto.RENAME2,
        proto.LINK,
        proto.SYMLINK,
        proto.SETXATTR,
        proto.REMOVEXATTR,
    }
)
"""Requests that would change the directory: snapshots change through the store only.
(TMPFILE is not one of them: ENOSYS, which the kernel answers with EOPNOTSUPP, as it does
for libfuse 3.14, which does not know the request; programs then fall back to creating a
file, which is refused.)"""


class _Dir:
    """An open directory: the listing READDIR pages through, taken at offset 0."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, Attr | None]] = []


class _Worker:
    """One thread's buffers: a request is read into `request`, a READ reply built in `reply`."""

    __slots__ = ("reply", "request")

    def __init__(self, size: int) -> None:
        self.request = memoryview(bytearray(size))
        self.reply = memoryview(bytearray(size))


Handler = Callable[[_Worker, int, memoryview], Reply]


def _set_io_flusher() -> None:
    """Mark this thread as an I/O flusher (best effort), so that serving a loop device's
    backing file cannot deadlock on the page cache writeback it is asked to do."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _pack_attr(attr: Attr) -> tuple[int, ...]:
    sec, nsec = divmod(attr.mtime_ns, 1_000_000_000)
    return (
        attr.ino,
        attr.size,
        attr.blocks,
        sec,
        sec,
        sec,
        nsec,
        nsec,
        nsec,
        attr.mode,
        attr.nlink,
        attr.uid,
        attr.gid,
        0,
        BLKSIZE,
        0,
    )


def _entry(attr: Attr) -> bytes:
    return proto.ENTRY_OUT.pack(attr.ino, 0, ENTRY_VALID, ATTR_VALID, 0, 0, *_pack_attr(attr))


def _error(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


class Server:
    """Serves one FUSE connection's descriptor (owned: closed when `run` returns)."""

    def __init__(self, namespace: Namespace, fd: int, *, threads: int, max_write: int) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise errors.InvalidArgument(f"threads must be a positive int, not {threads!r}")
        if not isinstance(max_write, int) or isinstance(max_write, bool) or not 4096 <= max_write <= 1 << 24:
            raise errors.InvalidArgument(f"max_write must be an int from 4096 to 16 MiB, not {max_write!r}")
        self.namespace = namespace
        self.fd = fd
        self.threads = threads
        self.max_write = max_write
        self.minor = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._handles: dict[int, Volume | _Dir] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._handlers: dict[int, Handler] = {
            proto.INIT: self._init,
            proto.DESTROY: self._destroy,
            proto.LOOKUP: self._lookup,
            proto.GETATTR: self._getattr,
            proto.SETATTR: self._setattr,
            proto.OPEN: self._open,
            proto.READ: self._read,
            proto.WRITE: self._write,
            proto.FLUSH: self._nothing,
            proto.RELEASE: self._release,
            proto.FSYNC: self._fsync,
            proto.OPENDIR: self._opendir,
            proto.READDIR: self._readdir,
            proto.READDIRPLUS: self._readdirplus,
            proto.RELEASEDIR: self._releasedir,
            proto.FSYNCDIR: self._nothing,
            proto.STATFS: self._statfs,
            proto.ACCESS: self._access,
            proto.GETXATTR: self._getxattr,
            proto.LISTXATTR: self._listxattr,
            proto.LSEEK: self._lseek,
            proto.FALLOCATE: self._fallocate,
        }

    # -- the request loop ----------------------------------------------------

    def run(self) -> None:
        """Serve until the kernel ends the connection; raise what stopped a worker early."""
        workers = [
            threading.Thread(target=self._work, name=f"fuse worker {i}", daemon=True)
            for i in range(self.threads)
        ]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            os.close(self.fd)
            self._close_handles()
        if self._failure is not None:
            raise self._failure

    def _work(self) -> None:
        _set_io_flusher()
        worker = _Worker(self.max_write + HEADER_ROOM)
        buffers = [worker.request]
        try:
            while True:
                try:
                    n = os.readv(self.fd, buffers)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:
                        return
                    if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                        continue
                    raise
                self._handle(worker, worker.request[:n])
        except BaseException as exc:
            log.error("FUSE worker stopped: %s", exc, exc_info=exc)
            with self._lock:
                if self._failure is None:
                    self._failure = exc

    def _handle(self, worker: _Worker, request: memoryview) -> None:
        length, opcode, unique, nodeid = proto.IN_HEADER.unpack_from(request)[:4]
        body = request[proto.IN_HEADER.size : length]
        if opcode in proto.NO_REPLY:
            return
        handler = self._handlers.get(opcode)
        try:
            if handler is not None:
                reply = handler(worker, nodeid, body)
            elif opcode in REFUSED:
                raise _error(errno.EPERM, "a snapshot's file cannot be created, renamed or removed here")
            else:
                raise _error(errno.ENOSYS, f"opcode {opcode}")
        except Exception as exc:
            code = errno_of(exc)
            if not isinstance(exc, (OSError, errors.Error)):
                log.exception("FUSE request %d (opcode %d, inode %d) failed", unique, opcode, nodeid)
            elif code == errno.EIO:
                log.warning("FUSE request %d (opcode %d, inode %d): %s", unique, opcode, nodeid, exc)
            self._send(unique, -code, None)
            return
        self._send(unique, 0, reply)

    def _send(self, unique: int, error: int, payload: Reply) -> None:
        size = 0 if payload is None else len(payload)
        header = proto.OUT_HEADER.pack(proto.OUT_HEADER.size + size, error, unique)
        try:
            os.writev(self.fd, [header] if payload is None else [header, payload])
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return
            log.error("FUSE reply to request %d refused (%s); answering EIO", unique, exc)
            if error == 0:
                self._send(unique, -errno.EIO, None)

    # -- handles -------------------------------------------------------------

    def _add(self, handle: Volume | _Dir) -> int:
        with self._lock:
            fh = next(self._ids)
            self._handles[fh] = handle
        return fh

    def _volume(self, fh: int) -> Volume:
        handle = self._handles.get(fh)
        if handle is None or isinstance(handle, _Dir):
            raise _error(errno.EBADF, f"no open file has handle {fh}")
        return handle

    def _dir(self, fh: int) -> _Dir:
        handle = self._handles.get(fh)
        if not isinstance(handle, _Dir):
            raise _error(errno.EBADF, f"no open directory has handle {fh}")
        return handle

    def _close_handles(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            if not isinstance(h, _Dir):
                h.close()

    # -- session -------------------------------------------------------------

    def _init(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        major, minor, max_readahead, flags = proto.INIT_IN.unpack_from(body)
        if major < proto.KERNEL_VERSION or (
            major == proto.KERNEL_VERSION and minor < proto.MIN_MINOR_VERSION
        ):
            log.error("the kernel offers FUSE %d.%d, older than 7.%d", major, minor, proto.MIN_MINOR_VERSION)
            raise _error(errno.EPROTO, f"FUSE protocol {major}.{minor}")
        if major > proto.KERNEL_VERSION:
            return proto.INIT_OUT.pack(proto.KERNEL_VERSION, proto.KERNEL_MINOR_VERSION, *[0] * 9)
        if flags & proto.INIT_EXT and len(body) >= proto.INIT_IN.size + proto.INIT_IN_FLAGS2.size:
            flags |= proto.INIT_IN_FLAGS2.unpack_from(body, proto.INIT_IN.size)[0] << 32
        self.minor = min(minor, proto.KERNEL_MINOR_VERSION)
        granted = flags & WANTED
        if granted >> 32:
            granted |= proto.INIT_EXT
        max_pages = (self.max_write + self._page - 1) // self._page
        max_write = self.max_write if granted & proto.MAX_PAGES else min(self.max_write, 32 * self._page)
        log.debug("FUSE 7.%d, flags %#x, max_write %d", self.minor, granted, max_write)
        return proto.INIT_OUT.pack(
            proto.KERNEL_VERSION,
            self.minor,
            min(max_readahead, self.max_write),
            granted & 0xFFFFFFFF,
            MAX_BACKGROUND,
            MAX_BACKGROUND * 3 // 4,
            max_write,
            1,
            max_pages,
            0,
            granted >> 32,
        )

    def _destroy(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        self._close_handles()
        return None

    def _nothing(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        return None

    # -- names and attributes --------------------------------------------------

    def _lookup(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        name = bytes(body).split(b"\0", 1)[0]
        return _entry(self.namespace.lookup(nodeid, name))

    def _attr_out(self, attr: Attr) -> bytes:
        return proto.ATTR_OUT.pack(ATTR_VALID, 0, 0, *_pack_attr(attr))

    def _getattr(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        return self._attr_out(self.namespace.getattr(nodeid))

    def _setattr(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fields = proto.SETATTR_IN.unpack_from(body)
        valid, size, mode, uid, gid = fields[0], fields[3], fields[11], fields[13], fields[14]
        attr = self.namespace.setattr(
            nodeid,
            size if valid & proto.FATTR_SIZE else None,
            mode=mode if valid & proto.FATTR_MODE else None,
            uid=uid if valid & proto.FATTR_UID else None,
            gid=gid if valid & proto.FATTR_GID else None,
        )
        return self._attr_out(attr)

    def _access(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        self.namespace.getattr(nodeid)
        return None

    def _getxattr(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        """A file has no extended attributes: ENODATA rather than ENOSYS (which the kernel
        turns into EOPNOTSUPP), so that `cp -a`, `ls` and tar see none."""
        raise _error(errno.ENODATA, "a snapshot's file has no extended attributes")

    def _listxattr(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        size = proto.GETXATTR_IN.unpack_from(body)[0]
        return proto.GETXATTR_OUT.pack(0, 0) if size == 0 else b""

    def _statfs(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        bsize, blocks, bfree, bavail, files, ffree, namemax = self.namespace.statfs()
        return proto.STATFS_OUT.pack(blocks, bfree, bavail, files, ffree, bsize, namemax, bsize, 0)

    # -- files -----------------------------------------------------------------

    def _open(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        """A handle on a volume: cached if its bytes cannot change, else direct I/O."""
        flags = proto.OPEN_IN.unpack_from(body)[0]
        volume = self.namespace.open(nodeid, flags)
        if volume.readonly:
            open_flags = proto.FOPEN_KEEP_CACHE
        else:
            open_flags = proto.FOPEN_DIRECT_IO | proto.FOPEN_PARALLEL_DIRECT_WRITES
        return proto.OPEN_OUT.pack(self._add(volume), open_flags, 0)

    def _release(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh = proto.RELEASE_IN.unpack_from(body)[0]
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None and not isinstance(handle, _Dir):
            handle.close()
        return None

    def _read(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        """Fill the worker's reply buffer in place; short at the end of the file."""
        fh, offset, size = proto.READ_IN.unpack_from(body)[:3]
        volume = self._volume(fh)
        n = max(0, min(size, volume.size - offset, len(worker.reply)))
        view = worker.reply[:n]
        if n:
            volume.preadinto(view, offset)
        return view

    def _write(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        """Write what fits: a file cannot grow, so a write from its end is ENOSPC (a full
        device) and one across it is short. A volume whose snapshot was committed or
        removed since the open raises NotFound (ESTALE) and writes nothing."""
        fh, offset, size = proto.WRITE_IN.unpack_from(body)[:3]
        volume = self._volume(fh)
        if volume.readonly:
            raise _error(errno.EROFS, f"snapshot {volume.key!r} is read-only")
        if size and offset >= volume.size:
            raise _error(errno.ENOSPC, f"write at {offset}: a snapshot's file ends at {volume.size}")
        n = min(size, volume.size - offset)
        if n:
            start = proto.WRITE_IN.size
            volume.pwrite(body[start : start + n], offset)
        return proto.WRITE_OUT.pack(n, 0)

    def _fsync(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh = proto.FSYNC_IN.unpack_from(body)[0]
        self.namespace.fsync(self._volume(fh))
        return None

    def _lseek(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh, offset, whence = proto.LSEEK_IN.unpack_from(body)[:3]
        return proto.LSEEK_OUT.pack(self.namespace.seek(self._volume(fh), offset, whence))

    def _fallocate(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh, offset, length, mode = proto.FALLOCATE_IN.unpack_from(body)[:4]
        self.namespace.allocate(self._volume(fh), mode, offset, length)
        return None

    # -- the directory ---------------------------------------------------------

    def _opendir(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        if nodeid != proto.ROOT_ID:
            raise _error(errno.ENOTDIR, f"inode {nodeid} is not a directory")
        return proto.OPEN_OUT.pack(self._add(_Dir()), 0, 0)

    def _releasedir(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh = proto.RELEASE_IN.unpack_from(body)[0]
        with self._lock:
            self._handles.pop(fh, None)
        return None

    def _listing(self, fh: int, offset: int) -> list[tuple[bytes, Attr | None]]:
        """The directory's entries (None: the mount point itself); a fresh listing at offset 0
        (opendir and rewinddir), so that the offsets of one pass (cookies: an entry's index
        plus one) stay stable while snapshots come and go."""
        d = self._dir(fh)
        if offset == 0:
            d.entries = [(b".", None), (b"..", None), *self.namespace.listdir()]
        return d.entries

    def _readdir(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh, offset, size = proto.READ_IN.unpack_from(body)[:3]
        return self._dirents(self._listing(fh, offset), offset, size, plus=False)

    def _readdirplus(self, worker: _Worker, nodeid: int, body: memoryview) -> Reply:
        fh, offset, size = proto.READ_IN.unpack_from(body)[:3]
        return self._dirents(self._listing(fh, offset), offset, size, plus=True)

    def _dirents(
        self, entries: list[tuple[bytes, Attr | None]], offset: int, size: int, *, plus: bool
    ) -> bytearray:
        out = bytearray()
        for index in range(offset, len(entries)):
            name, attr = entries[index]
            ino = proto.ROOT_ID if attr is None else attr.ino
            mode = stat.S_IFDIR if attr is None else attr.mode
            record = bytearray()
            if plus:
                record += bytes(proto.ENTRY_OUT.size) if attr is None else _entry(attr)
            record += proto.DIRENT.pack(ino, index + 1, len(name), stat.S_IFMT(mode) >> 12)
            record += name
            record += bytes(-len(record) % proto.DIRENT_ALIGN)
            if len(out) + len(record) > size:
                break
            out += record
        return out
