"""Fixed-newstyle option negotiation, from the greeting to a `Session`.

The client sends options until it picks an export (EXPORT_NAME or GO) or gives up
(ABORT). Each option gets its replies here; what they settle (the export opened, the
transmission flags advertised, structured replies, the metadata contexts chosen) becomes
one immutable `Session` that the transmission phase serves. Once the server is stopping,
every option but EXPORT_NAME and ABORT gets ERR_SHUTDOWN.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import errors
from ..types import Kind
from . import proto as P
from .stream import Disconnect, drain, recv_exact

if TYPE_CHECKING:
    from ..volume import Volume
    from .server import ExportTable

log = logging.getLogger(__package__)

MAX_OPTION = 64 * 1024
"""Longest option data read; longer data is drained and refused with ERR_TOO_BIG."""

EXPORT_NAME_PADDING = bytes(124)

CONTEXT_IDS = {P.CONTEXT_BASE_ALLOCATION: 1, P.CONTEXT_ALLOCATION_DEPTH: 2}
"""The metadata contexts offered, with the id each has in BLOCK_STATUS replies."""

_NAMESPACE_CONTEXTS = {"base:": (P.CONTEXT_BASE_ALLOCATION,), "qemu:": (P.CONTEXT_ALLOCATION_DEPTH,)}


@dataclass(frozen=True)
class Session:
    """What negotiation settled for one connection: the transmission phase serves it.

    `volume` is the open export, owned by the connection, which closes it at the end.
    `flags` are the transmission flags advertised; `contexts` the (id, name) of each
    metadata context chosen for this export; `chunk_size` is the store's, the preferred
    block size advertised.
    """

    export: str
    volume: Volume
    size: int
    readonly: bool
    flags: int
    structured: bool
    contexts: tuple[tuple[int, str], ...]
    chunk_size: int


def transmission_flags(readonly: bool, structured: bool) -> int:
    """The transmission flags of an export: what a client may send it."""
    flags = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_CACHE
    flags |= P.TFLAG_CAN_MULTI_CONN
    if readonly:
        flags |= P.TFLAG_READ_ONLY
    else:
        flags |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO
    if structured:
        flags |= P.TFLAG_SEND_DF
    return flags


def negotiate(sock: socket.socket, exports: ExportTable, stopping: threading.Event) -> Session | None:
    """Negotiate options on `sock`; the Session chosen, or None if the client aborted.

    Raises Disconnect when the client breaks the protocol or names no export it may open
    with EXPORT_NAME (which has no way to report an error), OSError when the socket fails.
    """
    return _Negotiation(sock, exports, stopping).run()


class _Negotiation:
    """The options one client has settled so far."""

    def __init__(self, sock: socket.socket, exports: ExportTable, stopping: threading.Event) -> None:
        self.sock = sock
        self.exports = exports
        self.stopping = stopping
        self.no_zeroes = False
        self.structured = False
        self.contexts: tuple[tuple[int, str], ...] = ()
        self.contexts_for: str | None = None

    def run(self) -> Session | None:
        sock = self.sock
        sock.sendall(P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = P.CLIENT_FLAGS.unpack(recv_exact(sock, 4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise Disconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = P.OPTION.unpack(recv_exact(sock, P.OPTION.size))
            if magic != P.IHAVEOPT:
                raise Disconnect(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                drain(sock, length)
                self._error(option, P.REP_ERR_TOO_BIG, f"option data of {length} bytes is too long")
                continue
            data = recv_exact(sock, length) if length else b""
            if option == P.OPT_EXPORT_NAME:
                return self._export_name(data)
            if option == P.OPT_ABORT:
                with contextlib.suppress(OSError):
                    self._reply(option, P.REP_ACK)
                return None
            if self.stopping.is_set():
                self._error(option, P.REP_ERR_SHUTDOWN, "the server is shutting down")
                continue
            try:
                session = self._option(option, data)
            except errors.Unavailable as exc:
                log.warning("nbd: the store cannot serve: %s", exc)
                self._error(option, P.REP_ERR_SHUTDOWN, str(exc))
                continue
            if session is not None:
                return session

    def _option(self, option: int, data: bytes) -> Session | None:
        """Answer one option; the Session once GO (or INFO) opened an export."""
        if option in (P.OPT_INFO, P.OPT_GO):
            return self._info(option, data)
        if option == P.OPT_LIST:
            self._list(data)
        elif option == P.OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._reply(option, P.REP_ACK)
        elif option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option == P.OPT_STARTTLS:
            self._error(option, P.REP_ERR_POLICY, "TLS is not offered; use a unix socket or loopback")
        else:
            self._error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, reply, len(data)) + data)

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, message.encode()[: P.MAX_STRING])

    def _open(self, key: str) -> Session:
        """Open export `key` with what was negotiated; errors.Error if it cannot be opened."""
        volume = self.exports.open(key)
        return Session(
            export=key,
            volume=volume,
            size=volume.size,
            readonly=volume.readonly,
            flags=transmission_flags(volume.readonly, self.structured),
            structured=self.structured,
            contexts=self.contexts if self.contexts_for == key else (),
            chunk_size=self.exports.chunk_size,
        )

    def _export_name(self, data: bytes) -> Session:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise Disconnect("the export name is not UTF-8") from None
        info = self.exports.find(name)
        if info is None:
            raise Disconnect(f"no export {name!r}")
        try:
            session = self._open(info.name)
        except errors.Error as exc:
            raise Disconnect(f"cannot open export {name!r}: {exc}") from exc
        reply = P.EXPORT_NAME_REPLY.pack(session.size, session.flags)
        with _closed_on_failure(session):
            self.sock.sendall(reply if self.no_zeroes else reply + EXPORT_NAME_PADDING)
        return session

    def _info(self, option: int, data: bytes) -> Session | None:
        """NBD_OPT_INFO or NBD_OPT_GO; the Session when GO succeeded."""
        if len(data) < 6:
            self._error(option, P.REP_ERR_INVALID, "truncated request")
            return None
        (n,) = P.U32.unpack_from(data)
        if n > len(data) - 6:
            self._error(option, P.REP_ERR_INVALID, "export name length exceeds the option")
            return None
        (count,) = P.U16.unpack_from(data, 4 + n)
        if len(data) != 6 + n + 2 * count:
            self._error(option, P.REP_ERR_INVALID, "information request list has the wrong length")
            return None
        try:
            name = data[4 : 4 + n].decode()
        except UnicodeDecodeError:
            self._error(option, P.REP_ERR_INVALID, "the export name is not UTF-8")
            return None
        info = self.exports.find(name)
        if info is None:
            self._error(
                option, P.REP_ERR_UNKNOWN, f"no export {name!r}: exports are active and view snapshots"
            )
            return None
        session = None
        if option == P.OPT_GO:
            try:
                session = self._open(info.name)
            except errors.Error as exc:
                self._error(option, P.REP_ERR_UNKNOWN, f"cannot open export {name!r}: {exc}")
                return None
            size, flags = session.size, session.flags
        else:
            size, flags = info.size, transmission_flags(info.kind is Kind.VIEW, self.structured)
        key = info.name.encode()
        description = f"cowstore {info.kind.value} snapshot" + (f" of {info.parent}" if info.parent else "")
        with _closed_on_failure(session):
            self._reply(option, P.REP_INFO, P.INFO_EXPORT_REPLY.pack(P.INFO_EXPORT, size, flags))
            self._reply(option, P.REP_INFO, P.U16.pack(P.INFO_NAME) + key)
            self._reply(option, P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + description.encode())
            self._reply(
                option,
                P.REP_INFO,
                P.INFO_BLOCK_SIZE_REPLY.pack(P.INFO_BLOCK_SIZE, 1, self.exports.chunk_size, P.MAX_PAYLOAD),
            )
            self._reply(option, P.REP_ACK)
        return session

    def _list(self, data: bytes) -> None:
        if data:
            self._error(P.OPT_LIST, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for key in self.exports.names():
            raw = key.encode()
            self._reply(P.OPT_LIST, P.REP_SERVER, P.U32.pack(len(raw)) + raw)
        self._reply(P.OPT_LIST, P.REP_ACK)

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.contexts, self.contexts_for = (), None
            if not self.structured:
                self._error(option, P.REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
                return
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return
        info = self.exports.find(name)
        if info is None:
            self._error(option, P.REP_ERR_UNKNOWN, f"no export {name!r}")
            return
        found: list[str] = []
        if not queries and not setting:
            found = list(CONTEXT_IDS)
        for q in queries:
            if q in CONTEXT_IDS:
                matches: Sequence[str] = (q,)
            elif not setting:
                matches = _NAMESPACE_CONTEXTS.get(q, ())
            else:
                matches = ()
            found.extend(m for m in matches if m not in found)
        for context in found:
            ident = CONTEXT_IDS[context] if setting else 0
            self._reply(option, P.REP_META_CONTEXT, P.U32.pack(ident) + context.encode())
        if setting:
            self.contexts = tuple((CONTEXT_IDS[c], c) for c in found)
            self.contexts_for = info.name
        self._reply(option, P.REP_ACK)


@contextlib.contextmanager
def _closed_on_failure(session: Session | None):
    """Close the session's volume if the replies that announce it cannot be sent."""
    try:
        yield
    except BaseException:
        if session is not None:
            with contextlib.suppress(Exception):
                session.volume.close()
        raise


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """Export name and queries of a LIST/SET_META_CONTEXT option; ValueError if malformed."""
    try:
        (n,) = P.U32.unpack_from(data, 0)
        pos = 4 + n
        if pos + 4 > len(data):
            raise ValueError("export name length exceeds the option")
        name = data[4:pos].decode()
        (count,) = P.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (q,) = P.U32.unpack_from(data, pos)
            pos += 4
            if pos + q > len(data):
                raise ValueError("query length exceeds the option")
            queries.append(data[pos : pos + q].decode())
            pos += q
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed metadata context request: {exc}") from None
    if pos != len(data):
        raise ValueError("trailing bytes after the metadata context queries")
    return name, queries
