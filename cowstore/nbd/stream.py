"""Reading whole messages from a client's socket, and the exception that ends a connection.

Both protocol phases read through these: option and request headers must arrive whole,
and a payload the server refuses must still be read off the socket to keep in step.
"""

from __future__ import annotations

import socket

DRAIN_BUFFER = 256 * 1024


class Disconnect(Exception):
    """The connection must end now: the peer left, or broke the protocol."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from `sock`; Disconnect if the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise Disconnect("the client closed the connection")
        got += k
    return bytes(buf)


def drain(sock: socket.socket, n: int) -> None:
    """Read and drop `n` bytes from `sock`; Disconnect if the peer closes first."""
    scratch = memoryview(bytearray(min(n, DRAIN_BUFFER) or 1))
    while n:
        k = sock.recv_into(scratch, min(n, len(scratch)))
        if not k:
            raise Disconnect("the client closed the connection")
        n -= k
