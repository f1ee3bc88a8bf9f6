"""The transmission phase: requests in, replies out, until DISC or the connection ends.

`Transmission` serves one `Session` on its socket. The hot path avoids per-request system
calls and allocations:

- requests are read by `recv_into` into one receive buffer and parsed by a precompiled
  `struct.Struct`; a pipelining client delivers several requests per `recv` (about six
  at fio's queue depth 16), and all of them are handled before the next system call;
- a WRITE payload that arrived in the receive buffer is written from a memoryview of it;
  a large one is received straight into a reusable buffer with `MSG_WAITALL`;
- a READ is read by `preadinto` into a per-connection arena, and the replies of a whole
  batch of requests leave in one `sendmsg` of header and payload buffers, not joined.

Protocol choices, where proto.md leaves room:

- A structured READ of at least one chunk asks `Volume.block_status` for holes and sends
  unallocated ranges as OFFSET_HOLE chunks (never with the DF flag); shorter reads send
  data, which is cheaper than the lookup. Errors are ERROR chunks when structured
  replies were negotiated; other successful replies are simple replies.
- `base:allocation` reports a range as data when any layer of the chain supplies it and
  as HOLE|ZERO otherwise, as qemu-nbd does for a backing chain. A write into data that a
  parent supplies still allocates a chunk (copy on write), so it can fail with ENOSPC
  when the pool is full.
- WRITE_ZEROES and TRIM unallocate whole chunks. NO_HOLE is accepted but cannot reserve
  space (the store never stores zeros), and FAST_ZERO always succeeds, zeroing being
  metadata-only.
- Out of range: READ, TRIM, CACHE and BLOCK_STATUS get EINVAL, WRITE and WRITE_ZEROES
  ENOSPC (proto.md's SHOULDs). READ and WRITE over `MAX_PAYLOAD` (the advertised maximum
  block size) get EINVAL, a WRITE's payload being read and dropped first. A request on a
  snapshot that was committed or removed meanwhile gets ESHUTDOWN, telling the client to
  disconnect.
"""

from __future__ import annotations

import errno as _errno
import logging
import socket
import struct
import threading
from typing import TYPE_CHECKING

from .. import errors
from . import proto as P
from .proto import MAX_PAYLOAD
from .stream import Disconnect, drain

if TYPE_CHECKING:
    from ..volume import Volume
    from .handshake import Session

log = logging.getLogger(__package__)

MiB = 1 << 20
RECV_BUFFER = 256 * 1024
"""Requests are received into a buffer this size; a longer WRITE payload gets its own."""
ARENA = 1 * MiB
"""READ payloads of one batch of replies share an arena this size; a longer one gets its own."""
MAX_IOV = 512
"""Most buffers handed to one `sendmsg` (the kernel's IOV_MAX is 1024)."""
ZERO_STEP = 1 << 30
"""WRITE_ZEROES and TRIM go to the engine in steps this long; BLOCK_STATUS reports at most this."""

_COMMAND_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}
"""The flags each command accepts; a command missing here is unknown."""

_OS_ERRNO = {
    _errno.EPERM: P.EPERM,
    _errno.EACCES: P.EPERM,
    _errno.EROFS: P.EPERM,
    _errno.ENOSPC: P.ENOSPC,
    _errno.EDQUOT: P.ENOSPC,
    _errno.EFBIG: P.ENOSPC,
    _errno.EINVAL: P.EINVAL,
    _errno.ENOMEM: P.ENOMEM,
    _errno.EOVERFLOW: P.EOVERFLOW,
    _errno.ENOTSUP: P.ENOTSUP,
    _errno.ESHUTDOWN: P.ESHUTDOWN,
}

_pack_simple = P.SIMPLE_REPLY.pack
_pack_chunk = P.CHUNK.pack
_pack_data = P.CHUNK_DATA.pack
_SIMPLE = P.SIMPLE_REPLY_MAGIC
_STRUCTURED = P.STRUCTURED_REPLY_MAGIC
_DONE = P.REPLY_FLAG_DONE
_OFFSET_DATA = P.REPLY_TYPE_OFFSET_DATA


class _RequestError(Exception):
    """A request fails with an NBD error number; the connection carries on."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


_EXPECTED = (
    _RequestError,
    errors.InvalidArgument,
    errors.ReadOnly,
    errors.NoSpace,
    errors.NotFound,
    errors.Closed,
)
"""Failures a client can cause; any other is logged as a warning too."""


def _nbd_errno(exc: BaseException) -> int:
    """The NBD error number that reports `exc` to a client."""
    if isinstance(exc, _RequestError):
        return exc.error
    if isinstance(exc, (errors.Closed, errors.NotFound)):
        return P.ESHUTDOWN
    if isinstance(exc, PermissionError):
        return P.EPERM
    if isinstance(exc, errors.NoSpace):
        return P.ENOSPC
    if isinstance(exc, ValueError):
        return P.EINVAL
    if isinstance(exc, MemoryError):
        return P.ENOMEM
    if isinstance(exc, OSError) and exc.errno is not None:
        return _OS_ERRNO.get(exc.errno, P.EIO)
    return P.EIO


class SharedFlush:
    """Makes every acknowledged write durable; concurrent FLUSHes share one store flush.

    One per server, shared by its connections: a flush that started after a request
    arrived covers it, so a request that finds one completed while it waited for the lock
    returns without flushing again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = 0
        self._done = 0

    def flush(self, volume: Volume) -> None:
        arrival = self._started
        with self._lock:
            if self._done > arrival:
                return
            self._started += 1
            ticket = self._started
            volume.flush()
            self._done = ticket


class Transmission:
    """Serves the requests of one connection on the export its `Session` opened.

    The session's fields are copied into attributes: the request loop reads them on every
    request.
    """

    def __init__(
        self, sock: socket.socket, session: Session, shared_flush: SharedFlush, peer: object
    ) -> None:
        self.sock = sock
        self.peer = peer
        self._flush = shared_flush.flush
        self.volume = session.volume
        self.size = session.size
        self.readonly = session.readonly
        self.structured = session.structured
        self.contexts = session.contexts
        self._read_flags = _COMMAND_FLAGS[P.CMD_READ] if session.structured else P.CMD_FLAG_FUA
        self._out: list[bytes | memoryview] = []
        self._arena: memoryview = memoryview(b"")
        self._apos = 0
        self._big: memoryview | None = None
        self._big_in_use = False
        self._wbig: memoryview | None = None
        self._bs_max = min(ZERO_STEP, session.chunk_size * 16384)
        self._hole_min = session.chunk_size

    def run(self) -> None:
        """Serve requests until DISC or the client closes; Disconnect if it breaks the protocol."""
        self._arena = memoryview(bytearray(ARENA))
        sock = self.sock
        buf = bytearray(RECV_BUFFER)
        mv = memoryview(buf)
        unpack = P.REQUEST.unpack_from
        header = P.REQUEST.size
        start = end = 0
        need = header
        while True:
            while end - start >= header:
                magic, flags, kind, cookie, offset, length = unpack(buf, start)
                if magic != P.REQUEST_MAGIC:
                    raise Disconnect(f"bad request magic {magic:#x}")
                if kind == P.CMD_WRITE:
                    total = header + length
                    if end - start >= total:
                        self._write(flags, cookie, offset, length, mv[start + header : start + total])
                        start += total
                        continue
                    if total <= RECV_BUFFER:
                        need = total
                        break
                    have = mv[start + header : end]
                    start = end = 0
                    if length > MAX_PAYLOAD:
                        self._send_out()
                        drain(self.sock, length - len(have))
                        self._error(
                            cookie,
                            _RequestError(
                                P.EINVAL, f"write of {length} bytes is over the maximum of {MAX_PAYLOAD}"
                            ),
                        )
                        continue
                    self._write(flags, cookie, offset, length, self._recv_payload(have, length))
                    continue
                start += header
                if kind == P.CMD_READ:
                    self._read(flags, cookie, offset, length)
                elif kind == P.CMD_DISC:
                    self._send_out()
                    return
                else:
                    self._command(kind, flags, cookie, offset, length)
            else:
                need = header
            self._send_out()
            if start == end:
                start = end = 0
            elif start + need > RECV_BUFFER:
                rest = end - start
                buf[:rest] = mv[start:end]
                start, end = 0, rest
            n = sock.recv_into(mv[end:])
            if not n:
                return
            end += n

    def _send_out(self) -> None:
        """Send every queued reply, in as few `sendmsg` calls as the kernel allows."""
        out = self._out
        self._apos = 0
        self._big_in_use = False
        if not out:
            return
        self._out = []
        sendmsg = self.sock.sendmsg
        try:
            while out:
                batch = out[:MAX_IOV] if len(out) > MAX_IOV else out
                sent = sendmsg(batch)
                done = 0
                for item in batch:
                    n = len(item)
                    if sent < n:
                        break
                    sent -= n
                    done += 1
                del out[:done]
                if sent:
                    out[0] = memoryview(out[0])[sent:]
        except OSError as exc:
            raise Disconnect(f"sending failed: {exc}") from exc

    def _queue(self, data: bytes | memoryview) -> None:
        self._out.append(data)

    def _take(self, n: int) -> memoryview:
        """A buffer for `n` bytes of READ payload, valid until the next `_send_out`."""
        if n <= ARENA:
            if self._apos + n > ARENA or self._big_in_use:
                self._send_out()
            start = self._apos
            self._apos = start + n
            return self._arena[start : start + n]
        self._send_out()
        if self._big is None or len(self._big) < n:
            self._big = memoryview(bytearray(n))
        self._big_in_use = True
        return self._big[:n]

    def _recv_payload(self, have: memoryview, length: int) -> memoryview:
        """A WRITE payload too large for the receive buffer, received into its own buffer."""
        self._send_out()
        if self._wbig is None or len(self._wbig) < length:
            self._wbig = memoryview(bytearray(length))
        dest = self._wbig[:length]
        got = len(have)
        dest[:got] = have
        while got < length:
            n = self.sock.recv_into(dest[got:], length - got, socket.MSG_WAITALL)
            if not n:
                raise Disconnect("the client closed the connection in the middle of a write")
            got += n
        return dest

    def _ok(self, cookie: int) -> None:
        self._queue(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _error(self, cookie: int, exc: BaseException) -> None:
        """Reply with the error that `exc` stands for: an ERROR chunk when structured."""
        error = _nbd_errno(exc)
        if not isinstance(exc, _EXPECTED):
            log.warning("nbd: %s: request failed: %r", self.peer, exc)
        if self.structured:
            message = str(exc).encode()[: P.MAX_STRING]
            self._queue(
                P.CHUNK_ERROR.pack(
                    P.STRUCTURED_REPLY_MAGIC,
                    P.REPLY_FLAG_DONE,
                    P.REPLY_TYPE_ERROR,
                    cookie,
                    6 + len(message),
                    error,
                    len(message),
                )
                + message
            )
        else:
            self._queue(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie))
        if isinstance(exc, errors.Unavailable):
            # The store must be reopened: no later request can succeed on this connection.
            self._send_out()
            raise Disconnect(f"the store cannot serve: {exc}")

    def _check(self, kind: int, flags: int, offset: int, length: int, beyond: int = P.EINVAL) -> None:
        allowed = _COMMAND_FLAGS[kind]
        if not self.structured:
            allowed &= ~P.CMD_FLAG_DF
        if flags & ~allowed:
            raise _RequestError(P.EINVAL, f"flags {flags:#x} are not valid for command {kind}")
        if offset + length > self.size:
            raise _RequestError(beyond, f"range {offset}+{length} is beyond the export's {self.size} bytes")

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        try:
            if flags & ~self._read_flags or offset + length > self.size or length > MAX_PAYLOAD:
                self._check(P.CMD_READ, flags, offset, length)
                raise _RequestError(P.EINVAL, f"read of {length} bytes is over the maximum of {MAX_PAYLOAD}")
            if self.structured:
                if length >= self._hole_min and not flags & P.CMD_FLAG_DF:
                    runs = self._runs(offset, length)
                    if len(runs) > 1 or runs[0][2]:
                        self._read_sparse(cookie, runs, offset, length)
                        return
                if not length:
                    self._out.append(_pack_chunk(_STRUCTURED, _DONE, P.REPLY_TYPE_NONE, cookie, 0))
                    return
                data = self._take(length)
                self.volume.preadinto(data, offset)
                self._out += (_pack_data(_STRUCTURED, _DONE, _OFFSET_DATA, cookie, 8 + length, offset), data)
            else:
                data = self._take(length)
                self.volume.preadinto(data, offset)
                self._out += (_pack_simple(_SIMPLE, 0, cookie), data)
        except Disconnect:
            raise
        except Exception as exc:
            self._error(cookie, exc)

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, reads-as-zero) runs of the range, merged across depths."""
        runs: list[tuple[int, int, bool]] = []
        for e in self.volume.block_status(offset, length):
            zero = e.zero and not e.allocated
            if runs and runs[-1][2] == zero:
                o, n, _ = runs[-1]
                runs[-1] = (o, n + e.length, zero)
            else:
                runs.append((e.offset, e.length, zero))
        return runs

    def _read_sparse(self, cookie: int, runs: list[tuple[int, int, bool]], offset: int, length: int) -> None:
        """A structured READ of data and hole chunks; nothing is queued unless every read works."""
        data = self._take(length)
        volume = self.volume
        chunks: list[bytes | memoryview] = []
        last = len(runs) - 1
        for i, (o, n, zero) in enumerate(runs):
            done = P.REPLY_FLAG_DONE if i == last else 0
            if zero:
                chunks.append(
                    P.CHUNK_HOLE.pack(
                        P.STRUCTURED_REPLY_MAGIC, done, P.REPLY_TYPE_OFFSET_HOLE, cookie, 12, o, n
                    )
                )
            else:
                piece = data[o - offset : o - offset + n]
                volume.preadinto(piece, o)
                chunks.append(
                    P.CHUNK_DATA.pack(
                        P.STRUCTURED_REPLY_MAGIC, done, P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n, o
                    )
                )
                chunks.append(piece)
        for c in chunks:
            self._queue(c)

    def _write(self, flags: int, cookie: int, offset: int, length: int, payload: memoryview) -> None:
        try:
            if (
                flags & ~P.CMD_FLAG_FUA
                or offset + length > self.size
                or self.readonly
                or length > MAX_PAYLOAD
            ):
                self._check(P.CMD_WRITE, flags, offset, length, P.ENOSPC)
                if self.readonly:
                    raise _RequestError(P.EPERM, "the export is a read-only view")
                raise _RequestError(P.EINVAL, f"write of {length} bytes is over the maximum of {MAX_PAYLOAD}")
            self.volume.pwrite(payload, offset)
            if flags & P.CMD_FLAG_FUA:
                self._send_out()
                self._flush(self.volume)
            self._out.append(_pack_simple(_SIMPLE, 0, cookie))
        except Disconnect:
            raise
        except Exception as exc:
            self._error(cookie, exc)

    def _command(self, kind: int, flags: int, cookie: int, offset: int, length: int) -> None:
        """Every command but READ, WRITE and DISC."""
        try:
            if kind not in _COMMAND_FLAGS:
                raise _RequestError(P.EINVAL, f"unknown command {kind}")
            volume = self.volume
            if kind == P.CMD_FLUSH:
                self._check(kind, flags, 0, 0)
                if not self.readonly:
                    self._send_out()
                    self._flush(volume)
                self._ok(cookie)
            elif kind == P.CMD_BLOCK_STATUS:
                self._block_status(flags, cookie, offset, length)
            elif kind == P.CMD_CACHE:
                self._check(kind, flags, offset, length)
                self._ok(cookie)
            else:
                self._check(kind, flags, offset, length, P.ENOSPC if kind == P.CMD_WRITE_ZEROES else P.EINVAL)
                if self.readonly:
                    raise _RequestError(P.EPERM, "the export is a read-only view")
                zero = volume.write_zeroes if kind == P.CMD_WRITE_ZEROES else volume.discard
                end = offset + length
                while offset < end:
                    step = min(ZERO_STEP, end - offset)
                    zero(offset, step)
                    offset += step
                if flags & P.CMD_FLAG_FUA:
                    self._send_out()
                    self._flush(volume)
                self._ok(cookie)
        except Disconnect:
            raise
        except Exception as exc:
            self._error(cookie, exc)

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if not self.contexts:
            raise _RequestError(P.EINVAL, "no metadata context was negotiated for this export")
        self._check(P.CMD_BLOCK_STATUS, flags, offset, length)
        if length == 0:
            raise _RequestError(P.EINVAL, "block status of an empty range")
        extents = self.volume.block_status(offset, min(length, self._bs_max))
        one = flags & P.CMD_FLAG_REQ_ONE
        last = len(self.contexts) - 1
        for i, (ident, context) in enumerate(self.contexts):
            descriptors: list[int] = []
            for e in extents:
                if context == P.CONTEXT_BASE_ALLOCATION:
                    state = (0 if e.allocated else P.STATE_HOLE) | (P.STATE_ZERO if e.zero else 0)
                else:
                    state = e.depth
                if descriptors and descriptors[-1] == state:
                    descriptors[-2] += e.length
                else:
                    if one and descriptors:
                        break
                    descriptors += (e.length, state)
            payload = P.U32.pack(ident) + _pack_u32s(descriptors)
            done = P.REPLY_FLAG_DONE if i == last else 0
            self._queue(
                P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, done, P.REPLY_TYPE_BLOCK_STATUS, cookie, len(payload))
                + payload
            )


def _pack_u32s(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}I", *values)
