"""Every snapshot of a store as a regular file in a FUSE mount point.

`mount(store, mountpoint)` mounts and serves in background threads until `close()` or an
unmount from outside (`fusermount3 -u`). A store of the Cython engine is served by the
accelerator over libfuse3 (`_cserver`: reads and writes never take the GIL); one of the
pure-Python engine by `server`, which speaks the kernel's protocol itself. Both serve a
descriptor that `kernel.attach` made and ask `namespace.Namespace` for everything that is
not a read or a write.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import threading
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import FailedPrecondition, InvalidArgument
from . import kernel
from .namespace import Namespace, file_name, snapshot_key

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["MAX_IO", "Mount", "file_name", "mount", "server_module", "snapshot_key"]

log = logging.getLogger(__name__)

MAX_IO = 1 << 20
"""The largest read or write the kernel sends in one request."""
THREADS = 4
STOP_GRACE = 2.0
"""Seconds `close` waits for the kernel to end a connection whose mount point is busy
before it aborts it."""


def server_module(store: Store) -> ModuleType:
    """The server for the store's engine: `_cserver` for the Cython engine, else `server`."""
    if store.engine == "cython":
        try:
            return importlib.import_module("cowstore.fuse._cserver")
        except ImportError as exc:
            if os.environ.get("COWSTORE_REQUIRE_EXTENSION"):
                raise
            raise FailedPrecondition(f"the FUSE accelerator cannot be imported ({exc})") from exc
    return importlib.import_module("cowstore.fuse.server")


class Mount:
    """A mounted store: its snapshots are files in `mountpoint` until `close`."""

    def __init__(self, store: Store, mountpoint: str, *, threads: int = THREADS) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            raise InvalidArgument(f"threads must be an int from 1 to 64, not {threads!r}")
        self.store = store
        self.mountpoint = os.path.realpath(mountpoint)
        self.namespace = Namespace(store)
        module = server_module(store)
        fd = kernel.attach(self.mountpoint, max_read=MAX_IO)
        self._conn = kernel.connection(self.mountpoint)
        try:
            self._server = module.Server(self.namespace, fd, threads=threads, max_write=MAX_IO)
        except BaseException:
            os.close(fd)
            kernel.detach(self.mountpoint, lazy=True)
            raise
        self._error: BaseException | None = None
        self._closed = False
        self.ended = threading.Event()
        """Set once the kernel ended the connection: unmounted from outside, or `close`."""
        self._thread = threading.Thread(target=self._serve, name=f"fuse {self.mountpoint}", daemon=True)
        self._thread.start()
        with _open_lock:
            _open.add(self)

    def _serve(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:
            self._error = exc
        finally:
            self.ended.set()

    @property
    def running(self) -> bool:
        """False once the kernel ended the connection (unmounted from outside)."""
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the file system is unmounted; true if it was."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Unmount (lazily if busy, then end the connection) and flush the store; closing
        twice is harmless (the store may be closed by then)."""
        if self._closed:
            return
        self._closed = True
        with _open_lock:
            _open.discard(self)
        if self._thread.is_alive():
            if not kernel.detach(self.mountpoint):
                kernel.detach(self.mountpoint, lazy=True)
            if not self.wait(STOP_GRACE) and self._conn is not None:
                kernel.abort(self._conn)
            self._thread.join()
        if not self.store.readonly:
            self.store.flush()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_open: set[Mount] = set()
"""Mounts not closed yet, which `_close_at_exit` closes."""
_open_lock = threading.Lock()


@atexit.register
def _close_at_exit() -> None:
    """Close the mounts a process left open. Otherwise its exit hangs: closing a file still
    open in the mount sends FLUSH to a server that is no longer running (its threads are
    stopped at interpreter shutdown, and the Cython one's may ask for the GIL after it).
    An error is logged: a mount's connection is ended before its store is flushed."""
    with _open_lock:
        mounts = list(_open)
    for m in mounts:
        try:
            m.close()
        except Exception:
            log.exception("closing the mount on %s at exit", m.mountpoint)


def mount(store: Store, mountpoint: str, *, threads: int = THREADS) -> Mount:
    """Mount `store` on `mountpoint`: one file per snapshot, named `file_name(key)`."""
    return Mount(store, mountpoint, threads=threads)
