"""A thread that works for another process: the client's standard streams, working directory
and umask, and the points where the client's Ctrl-C or SIGTERM takes effect.

The daemon runs each client's command line on a thread of its own, with the code that runs
it in the client's own process unchanged: while `switches()` is in force, `sys.stdout` and
`sys.stderr` write to the streams the current thread borrowed (the client's descriptors) and
to the process's own for every other thread. The thread unshares its file system context
(unshare(CLONE_FS)), so its chdir and umask are its alone and relative paths mean what they
mean to the client. Where that is refused (a seccomp filter), `client` says so and the
thread keeps the daemon's directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

_CLONE_FS = 0x200
_local = threading.local()


class _Switch:
    """`sys.stdout` or `sys.stderr` for every thread: the stream the thread borrowed, else `own`."""

    def __init__(self, name: str, own: TextIO) -> None:
        self._name = name
        self.own = own

    def _current(self) -> TextIO:
        stream: TextIO | None = getattr(_local, self._name, None)
        return stream if stream is not None else self.own

    def write(self, text: str) -> int:
        return self._current().write(text)

    def flush(self) -> None:
        self._current().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)


@contextlib.contextmanager
def switches() -> Iterator[None]:
    """Make `sys.stdout` and `sys.stderr` per thread (for as long as a daemon runs)."""
    saved = sys.stdout, sys.stderr
    sys.stdout = _Switch("stdout", sys.stdout)
    sys.stderr = _Switch("stderr", sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@dataclass(frozen=True)
class Stream:
    """A client's text stream: its descriptor and how its process encodes and buffers it."""

    fd: int
    encoding: str = "utf-8"
    errors: str = "strict"
    line_buffering: bool = False

    def open(self) -> TextIO:
        raw = io.FileIO(self.fd, "w", closefd=False)
        return io.TextIOWrapper(
            io.BufferedWriter(raw),
            encoding=self.encoding,
            errors=self.errors,
            line_buffering=self.line_buffering,
        )


def _unshare_fs() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.unshare(_CLONE_FS)) == 0
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def client(
    stdout: Stream,
    stderr: Stream,
    *,
    cwd: int | None,
    umask: int | None,
    interrupted: Callable[[], int | None],
) -> Iterator[bool]:
    """Run the block as the client: its streams, its working directory (a descriptor) and its
    umask; `interrupted` gives the signal the client forwarded, if any (see `checkpoint`).
    Gives whether the thread now has the client's directory. Call on a thread of its own,
    which ends with the request: its file system context stays unshared."""
    if not isinstance(sys.stdout, _Switch) or not isinstance(sys.stderr, _Switch):
        raise RuntimeError("borrow.client needs borrow.switches() in force")
    own_directory = cwd is not None and _unshare_fs()
    if own_directory:
        assert cwd is not None
        os.fchdir(cwd)
        if umask is not None:
            os.umask(umask)
    out, err = stdout.open(), stderr.open()
    _local.stdout, _local.stderr = out, err
    _local.interrupted, _local.raised = interrupted, False
    try:
        yield own_directory
    finally:
        _local.stdout = _local.stderr = _local.interrupted = None
        for stream in (out, err):
            with contextlib.suppress(OSError, ValueError):
                stream.close()


def checkpoint() -> None:
    """Where a long command may stop: raise, once, what the client's forwarded signal raises in
    the client's own process (KeyboardInterrupt for SIGINT, SystemExit(128 + n) otherwise)."""
    interrupted: Callable[[], int | None] | None = getattr(_local, "interrupted", None)
    if interrupted is None or _local.raised:
        return
    signum = interrupted()
    if signum is None:
        return
    _local.raised = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)
