"""cowstore as containerd's snapshotter: the snapshots gRPC API on a Unix socket.

containerd talks to a proxy snapshotter over gRPC (`[proxy_plugins.cowstore] type =
"snapshot", address = PATH`). `Containerd(path, files)` is the daemon's front end that
serves it; `files` is the daemon's FUSE mount point (the FUSE front end, started before
it), where every snapshot is a file that containerd mounts through a loop device.

Modules: `api` (the `.proto` files and the code generated from them), `service` (the
gRPC servicer: messages and error codes), `snapshotter` (the policy: ext4 templates,
freezing at commit, mounts), `ext4` (formatting) and `loop` (loop devices, mounts, freezes:
the kernel side, done by a helper process so that the daemon never waits on its own FUSE files).
Needs the optional dependencies: `pip install cowstore[containerd]`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    import grpc

    from ..store import Store
    from .snapshotter import Snapshotter

__all__ = ["Containerd", "clear_stale", "prepare_socket"]

log = logging.getLogger(__name__)

THREADS = 8
"""RPCs served at once: a Commit that waits for a freeze must not hold up the others."""
STOP_GRACE = 2.0
"""Seconds `stop` lets RPCs in progress finish."""


def prepare_socket(path: str) -> None:
    """Make way for a new socket at `path`: a stale one (nobody accepts on it) is removed;
    a live one, or anything that is not a socket, is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise FailedPrecondition(f"{path} is in use: another process serves on it")


def clear_stale(files: str) -> None:
    """Unmount and detach loop devices left on the files in `files` by a daemon that died.
    Call it before a dead FUSE mount there is cleared: once that is detached, sysfs names
    the devices' backing files relative to it, no longer under `files`."""
    from . import loop

    stale = loop.under(os.path.realpath(files))
    if stale:
        log.warning("clearing %d loop devices left on %s: %s", len(stale), files, stale)
        with loop.Helpers() as helpers:
            helpers.clear(stale)


class Containerd:
    """containerd's snapshots API on the Unix socket `path` (mode 0600), for snapshots whose
    files the FUSE mount at `files` shows."""

    def __init__(self, path: str, files: str, *, ready: Callable[[str], None] | None = None) -> None:
        self.path = os.path.abspath(path)
        self.files = os.path.realpath(files)
        self._ready = ready
        self._server: grpc.Server | None = None
        self.snapshotter: Snapshotter | None = None

    def start(self, store: Store, ended: Callable[[], None]) -> None:
        """Clear loop devices a killed daemon left on our files (`clear_stale`, if the caller
        did not before mounting), then serve."""
        import grpc

        from . import service
        from .snapshotter import Snapshotter

        clear_stale(self.files)
        self.snapshotter = Snapshotter(store, self.files)
        prepare_socket(self.path)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="cowstore-containerd")
        )
        service.add_to_server(service.Servicer(self.snapshotter), server)
        # Bind in a private directory, then rename into place: the socket is never reachable
        # before its mode is 0600.
        private = tempfile.mkdtemp(prefix=".cowstore-", dir=os.path.dirname(self.path))
        try:
            bound = os.path.join(private, "sock")
            if server.add_insecure_port(f"unix:{bound}") == 0:
                raise FailedPrecondition(f"cannot listen on {self.path}")
            server.start()
            os.chmod(bound, 0o600)
            os.rename(bound, self.path)
        except BaseException:
            server.stop(None)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(private)
        self._server = server
        if self._ready is not None:
            self._ready(self.path)

    def stop(self) -> None:
        """Finish RPCs in progress (briefly), stop serving, remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(STOP_GRACE).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.snapshotter is not None:
            self.snapshotter.close()
            if not self.snapshotter.store.readonly:
                self.snapshotter.store.flush()
