"""The process that owns a store: its front ends, its control socket, its shutdown.

`run` is the one place front ends start and stop. Each front end is a way in to the open
store (NBD, FUSE files; containerd's snapshots API will be one more: a class with `start`
and `stop`, and a flag in `cowstore serve` that adds it). The control socket (`control`)
lets every other `cowstore` command run in this process against the same store, through
`Shared`. SIGTERM or SIGINT, or a front end that ends on its own (a FUSE mount unmounted
from outside), stop the daemon: the control socket goes first, then the front ends in
reverse order, each flushing; the caller closes the store.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import borrow, control
from .errors import ReadOnly

if TYPE_CHECKING:
    from .fuse import Mount
    from .nbd import Server as NbdServer
    from .store import Store

log = logging.getLogger(__name__)


class FrontEnd(Protocol):
    """A way in to the daemon's store."""

    def start(self, store: Store, ended: Callable[[], None]) -> None:
        """Begin serving in background threads; call `ended` if serving stops on its own."""

    def stop(self) -> None:
        """Stop serving and flush what it wrote."""


class Nbd:
    """The NBD server (`cowstore.nbd.Server`, its keyword arguments as given); `ready` is
    called with it once it listens."""

    def __init__(self, ready: Callable[[NbdServer], None] | None = None, **options: Any) -> None:
        self._ready = ready
        self._options = options
        self._server: NbdServer | None = None

    def start(self, store: Store, ended: Callable[[], None]) -> None:
        from .nbd import Server

        self._server = Server(store, **self._options).start_in_thread()
        if self._ready is not None:
            self._ready(self._server)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


class Fuse:
    """Every snapshot as a file in `mountpoint` (`cowstore.fuse.mount`); `ready` is called
    with the mount once the files are there."""

    def __init__(
        self, mountpoint: str, *, threads: int = 4, ready: Callable[[Mount], None] | None = None
    ) -> None:
        self._mountpoint = mountpoint
        self._threads = threads
        self._ready = ready
        self._mount: Mount | None = None

    def start(self, store: Store, ended: Callable[[], None]) -> None:
        from . import fuse

        self._mount = m = fuse.mount(store, self._mountpoint, threads=self._threads)

        def watch() -> None:
            m.ended.wait()
            ended()

        threading.Thread(target=watch, name="cowstore-fuse-watch", daemon=True).start()
        if self._ready is not None:
            self._ready(m)

    def stop(self) -> None:
        if self._mount is not None:
            self._mount.close()


class Shared:
    """The daemon's store as the commands it runs for clients borrow it: never closed by
    them, read-only for a command given --read-only, verifying reads for one given --verify."""

    def __init__(self, store: Store, path: Path) -> None:
        self.store = store
        self.path = path
        self._lock = threading.Lock()
        self._verifying = 0
        self._always_verifies = store.verify_reads

    @contextlib.contextmanager
    def borrow(self, *, readonly: bool = False, verify: bool = False) -> Iterator[Store]:
        with self._verify() if verify else contextlib.nullcontext():
            yield cast("Store", ReadOnlyStore(self.store, self.path)) if readonly else self.store

    @contextlib.contextmanager
    def _verify(self) -> Iterator[None]:
        """Reads verify their chunk sums while any command asks for it (NBD and FUSE reads
        too: they can only fail where they would return damaged bytes)."""
        if self._always_verifies:
            yield
            return
        with self._lock:
            self._verifying += 1
            self.store.set_verify_reads(True)
        try:
            yield
        finally:
            with self._lock:
                self._verifying -= 1
                if not self._verifying:
                    self.store.set_verify_reads(False)


class ReadOnlyStore:
    """A store that refuses changes as one opened read-only does, for --read-only commands
    run by a daemon that has it open read-write."""

    _CHANGES = frozenset(
        {"prepare", "view", "commit", "remove", "rename", "update", "repair", "compact", "set_max_bytes"}
    )
    readonly = True

    def __init__(self, store: Store, path: Path) -> None:
        self._store = store
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name in self._CHANGES:
            raise ReadOnly(f"store {self._path} is open read-only: it cannot change")
        return getattr(self._store, name)

    def flush(self) -> None:
        return None


def run(store: Store, path: Path, front_ends: Sequence[FrontEnd], execute: control.Execute) -> None:
    """Serve `store` (at `path`) through `front_ends` and the control socket, whose requests
    `execute` runs, until SIGTERM or SIGINT (on the main thread) or a front end ends."""
    stopping = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stopping.set())
    started: list[FrontEnd] = []
    try:
        with borrow.switches():
            server = control.Server(path, execute)
            try:
                for front_end in front_ends:
                    front_end.start(store, stopping.set)
                    started.append(front_end)
                while not stopping.wait(1.0):
                    pass
            finally:
                try:
                    server.close()
                finally:
                    _stop(started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(front_ends: list[FrontEnd]) -> None:
    """Stop every front end, last started first; the first failure is raised once all stopped."""
    failure: BaseException | None = None
    for front_end in reversed(front_ends):
        try:
            front_end.stop()
        except BaseException as exc:
            log.exception("stopping %r failed", front_end)
            failure = failure or exc
    if failure is not None:
        raise failure
