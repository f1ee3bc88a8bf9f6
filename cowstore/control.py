"""The control socket: how `cowstore` commands reach the daemon that holds a store.

A daemon (`cowstore serve` or `cowstore mount`) listens on `control.sock` in the store
directory (mode 0600). A client sends one request, a JSON message with its standard output,
standard error and working directory as file descriptors (SCM_RIGHTS), so the daemon writes
the command's output straight to the client's streams, pipes and terminals alike. The daemon
answers `accepted` (or `closing`: it is stopping, run the command yourself), then, once the
command ran, its exit status. While it runs the client forwards SIGINT and SIGTERM; a client
that goes away counts as SIGHUP.

Messages are a 4-byte big-endian length and that many bytes of JSON. Both ends check the
other's uid (SO_PEERCRED): the daemon serves its own user and root; a client talks only to a
daemon of its own user or root. A socket left by a killed daemon refuses connections: a
client takes that as "no daemon", and the next daemon replaces it.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Error, Locked, Unavailable

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_MESSAGE = 1 << 20
MAX_FDS = 4
REQUEST_TIMEOUT = 30.0
"""Seconds a client has, once connected, to send its request."""
_HEADER = struct.Struct(">I")
_UCRED = struct.Struct("iII")


class ProtocolError(Error):
    """A message that is not a length-prefixed JSON object, or is too long."""


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int


def peer(sock: socket.socket) -> Peer:
    """SO_PEERCRED of a connected unix socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid)


def trusted(uid: int) -> bool:
    """Whether a peer of `uid` may be served or trusted: our own user, or root."""
    return uid in (os.getuid(), 0)


def socket_path(store: Path) -> Path:
    return store / SOCKET_NAME


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """`path` as an address bind and connect accept: through /proc/self/fd when it is longer
    than the 107 bytes a unix socket address holds."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- framing -------------------------------------------------------------------


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One message, with `fds` attached to its first byte."""
    body = json.dumps(message).encode()
    data = _HEADER.pack(len(body)) + body
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], rights)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors sent with it (close-on-exec); None at end of stream."""
    fds: list[int] = []
    try:
        header = b""
        while len(header) < _HEADER.size:
            data, ancillary, flags, _ = sock.recvmsg(
                _HEADER.size - len(header), socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} descriptors sent with a message")
            if not data:
                if header:
                    raise ProtocolError("the stream ended inside a message")
                return None
            header += data
        (length,) = _HEADER.unpack(header)
        if length > MAX_MESSAGE:
            raise ProtocolError(f"a message of {length} bytes (at most {MAX_MESSAGE})")
        body = bytearray()
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                raise ProtocolError("the stream ended inside a message")
            body += chunk
        try:
            message = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"a message that is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("a message that is not a JSON object")
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# -- the daemon's side -----------------------------------------------------------


@dataclass(eq=False)
class Request:
    """A client's command as the daemon runs it: the message, the descriptors sent with it
    (closed once it ran), the client process, and the first signal the client forwarded."""

    message: dict[str, Any]
    fds: list[int]
    client: Peer
    signal: int | None = None

    def interrupt(self, signum: int) -> None:
        if self.signal is None:
            self.signal = signum

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


Execute = Callable[[Request], int]
"""Runs a request on the calling thread (a new one per request) and gives its exit status."""


class Server:
    """Listens on a store's control socket and runs each request with `execute`, each on a
    thread of its own. `close` stops taking requests, interrupts the running ones (as SIGTERM)
    and waits up to `grace` seconds for them."""

    def __init__(self, store: Path, execute: Execute, *, grace: float = 10.0) -> None:
        self.path = socket_path(store)
        self._execute = execute
        self._grace = grace
        self._lock = threading.Lock()
        self._closing = False
        self._requests: dict[Request, threading.Thread] = {}
        self._listener = self._bind()
        self._thread = threading.Thread(target=self._accept, name="cowstore-control", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        """Bind beside the final name, set the mode, then rename over whatever a killed daemon
        left there: the caller holds the store's lock, so nothing else serves this store."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise Error(f"{self.path} exists and is not a socket: remove it to serve this store")
        temporary = self.path.with_name(f".{SOCKET_NAME}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with _addressable(temporary) as address:
                sock.bind(address)
            try:
                os.chmod(temporary, 0o600)
                os.rename(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                with self._lock:
                    if self._closing:
                        return
                log.exception("control: accept failed")
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="cowstore-request", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                client = peer(conn)
                if not trusted(client.uid):
                    refusal = f"this daemon serves uid {os.getuid()} and root, not {client.uid}"
                    send(conn, {"refused": refusal})
                    return
                conn.settimeout(REQUEST_TIMEOUT)
                received = receive(conn)
                conn.settimeout(None)
            except (OSError, ProtocolError) as exc:
                log.debug("control: a client went wrong: %s", exc)
                return
            if received is None:
                return
            request = Request(*received, client)
            try:
                with self._lock:
                    closing = self._closing
                    if not closing:
                        self._requests[request] = threading.current_thread()
                if closing:
                    with contextlib.suppress(OSError):
                        send(conn, {"closing": True})
                    return
                self._run(conn, request)
            finally:
                request.close()
                with self._lock:
                    self._requests.pop(request, None)

    def _run(self, conn: socket.socket, request: Request) -> None:
        try:
            send(conn, {"accepted": os.getpid()})
        except OSError:
            return
        watcher = threading.Thread(target=_watch, args=(conn, request), name="cowstore-watch", daemon=True)
        watcher.start()
        try:
            status = self._execute(request)
        except BaseException:
            log.exception("control: a request failed")
            status = 1
        with contextlib.suppress(OSError):
            send(conn, {"exit": status})
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        watcher.join()

    def close(self) -> None:
        """Stop listening and remove the socket, interrupt the running requests, wait for them."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            running = dict(self._requests)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._thread.join()
        for request in running:
            request.interrupt(signal.SIGTERM)
        for thread in running.values():
            thread.join(self._grace)
            if thread.is_alive():
                log.warning("control: a request still runs after %g seconds", self._grace)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watch(conn: socket.socket, request: Request) -> None:
    """Read the client's forwarded signals until it hangs up (which interrupts as SIGHUP)."""
    while True:
        try:
            received = receive(conn)
        except (OSError, ProtocolError):
            received = None
        if received is None:
            request.interrupt(signal.SIGHUP)
            return
        message, fds = received
        for fd in fds:
            os.close(fd)
        signum = message.get("signal")
        if isinstance(signum, int) and not isinstance(signum, bool):
            request.interrupt(signum)


# -- the client's side -------------------------------------------------------------


def connect(store: Path) -> socket.socket | None:
    """A connection to the daemon holding `store`, or None when none answers (no socket, or
    one left by a killed daemon). `Locked` if the daemon is not one to trust with our streams."""
    path = socket_path(store)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _addressable(path) as address:
            sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    server = peer(sock)
    if not trusted(server.uid):
        sock.close()
        raise Locked(f"store {store} is in use: process {server.pid} of uid {server.uid} serves it")
    return sock


def daemon_pid(store: Path) -> int | None:
    """The pid of the daemon holding `store`, if one answers on its control socket."""
    sock = connect(store)
    if sock is None:
        return None
    with sock:
        return peer(sock).pid


def call(store: Path, request: dict[str, Any], fds: Sequence[int]) -> int | None:
    """Run `request` in the daemon holding `store`, with our `fds`; its exit status, or None
    when no daemon takes it (run the command here). SIGINT and SIGTERM are forwarded while it
    runs; a second one leaves it to the daemon (it reads as a hang-up) and raises here."""
    sock = connect(store)
    if sock is None:
        return None
    with sock:
        daemon = peer(sock).pid
        try:
            send(sock, request, fds)
            received = receive(sock)
        except (BrokenPipeError, ConnectionResetError):
            return None
        if received is None or received[0].get("closing"):
            return None
        reply = received[0]
        if "refused" in reply:
            raise Locked(f"store {store} is in use: process {daemon} serves it and says: {reply['refused']}")
        try:
            with _forwarding(sock):
                received = receive(sock)
        except (OSError, ProtocolError):
            received = None
        if received is None or not isinstance(received[0].get("exit"), int):
            raise Unavailable(f"the cowstore daemon (process {daemon}) ended before the command did")
        status: int = received[0]["exit"]
        return status


@contextlib.contextmanager
def _forwarding(sock: socket.socket) -> Iterator[None]:
    """Forward the first SIGINT or SIGTERM to the daemon; the next one gets its usual handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def forward(signum: int, frame: object) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            send(sock, {"signal": signum})

    for sig in signals:
        signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
