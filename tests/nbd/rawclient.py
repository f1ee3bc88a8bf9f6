"""A raw-socket NBD client written for the tests, byte by byte from proto.md.

Enough of the protocol to poke at every corner of the server. Every socket has a
timeout, so a server that fails to answer fails the test instead of hanging it.
"""

from __future__ import annotations

import socket
import struct

from cowstore import nbd
from cowstore.nbd import proto as P

TIMEOUT = 10.0


class Closed(Exception):
    """The server closed the connection."""


class Client:
    """A minimal NBD client: enough of the protocol to poke at every corner of the server."""

    def __init__(self, address, *, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(address)
        magic, opt, self.handshake_flags = P.HANDSHAKE.unpack(self.recv(P.HANDSHAKE.size))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(P.CLIENT_FLAGS.pack(flags))
        self.size = 0
        self.tflags = 0
        self.structured = False
        self.contexts: dict[int, str] = {}

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            got = self.sock.recv(n - len(data))
            if not got:
                raise Closed(f"connection closed after {len(data)} of {n} bytes")
            data += got
        return bytes(data)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- options -------------------------------------------------------------

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, option, len(data)) + data)

    def option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        assert magic == P.OPTION_REPLY_MAGIC
        assert opt == option
        return reply, self.recv(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; every reply up to the final ACK or error."""
        self.send_option(option, data)
        replies = []
        while True:
            reply, payload = self.option_reply(option)
            replies.append((reply, payload))
            if reply == P.REP_ACK or reply & (1 << 31):
                return replies

    def structured_reply(self) -> None:
        assert self.option(P.OPT_STRUCTURED_REPLY) == [(P.REP_ACK, b"")]
        self.structured = True

    def set_meta_context(self, export: str, *queries: str, option: int = P.OPT_SET_META_CONTEXT):
        """Replies, and the contexts found: by id for SET, by name for LIST."""
        replies = self.option(option, meta_request(export, queries))
        found: dict = {}
        for reply, payload in replies:
            if reply == P.REP_META_CONTEXT:
                name = payload[4:].decode()
                key = P.U32.unpack_from(payload)[0] if option == P.OPT_SET_META_CONTEXT else name
                found[key] = name
        if option == P.OPT_SET_META_CONTEXT and replies[-1][0] == P.REP_ACK:
            self.contexts = found
        return replies, found

    def info(self, export: str, *requests: int, option: int = P.OPT_INFO) -> tuple[int, dict[int, bytes]]:
        name = export.encode()
        data = (
            P.U32.pack(len(name))
            + name
            + P.U16.pack(len(requests))
            + b"".join(P.U16.pack(r) for r in requests)
        )
        replies = self.option(option, data)
        infos = {}
        for reply, payload in replies:
            if reply == P.REP_INFO:
                infos[P.U16.unpack_from(payload)[0]] = payload[2:]
        if P.INFO_EXPORT in infos:
            self.size, self.tflags = struct.unpack(">QH", infos[P.INFO_EXPORT])
        return replies[-1][0], infos

    def go(self, export: str, *requests: int) -> int:
        return self.info(export, *requests, option=P.OPT_GO)[0]

    # -- transmission --------------------------------------------------------

    def send(
        self,
        kind: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        data: bytes = b"",
    ) -> None:
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, kind, cookie, offset, length) + data)

    def reply(self, read_length: int | None = None) -> tuple[int, int, list[tuple[int, int, bytes]]]:
        """(cookie, error, chunks) of one reply; a simple reply to a READ carries `read_length` bytes."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_length) if read_length and not error else b""
            return cookie, error, [(-1, 0, data)]
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks = []
        error = 0
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            chunks.append((kind, flags, payload))
            if kind & (1 << 15):
                error = struct.unpack_from(">I", payload)[0]
            if flags & P.REPLY_FLAG_DONE:
                return cookie, error, chunks
            (magic,) = struct.unpack(">I", self.recv(4))
            assert magic == P.STRUCTURED_REPLY_MAGIC

    def read(self, offset: int, length: int, *, flags: int = 0) -> bytes:
        self.send(P.CMD_READ, offset, length, flags=flags)
        _, error, chunks = self.reply(length)
        if error:
            raise OSError(error, "read failed")
        return assemble(chunks, offset, length)

    def write(self, offset: int, data: bytes, *, flags: int = 0) -> int:
        self.send(P.CMD_WRITE, offset, len(data), flags=flags, data=data)
        return self.reply()[1]

    def command(self, kind: int, offset: int = 0, length: int = 0, *, flags: int = 0) -> int:
        self.send(kind, offset, length, flags=flags)
        return self.reply()[1]

    def block_status(self, offset: int, length: int, *, flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        self.send(P.CMD_BLOCK_STATUS, offset, length, flags=flags)
        _, error, chunks = self.reply()
        if error:
            raise OSError(error, "block status failed")
        result = {}
        for kind, _, payload in chunks:
            assert kind == P.REPLY_TYPE_BLOCK_STATUS
            (ident,) = struct.unpack_from(">I", payload)
            values = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
            result[self.contexts[ident]] = list(zip(values[::2], values[1::2], strict=True))
        return result


def meta_request(export: str, queries) -> bytes:
    name = export.encode()
    body = P.U32.pack(len(name)) + name + P.U32.pack(len(queries))
    for q in queries:
        body += P.U32.pack(len(q.encode())) + q.encode()
    return body


def assemble(chunks: list[tuple[int, int, bytes]], offset: int, length: int) -> bytes:
    """The bytes a READ reply describes; asserts the chunks tile the range exactly."""
    if chunks and chunks[0][0] == -1:
        return chunks[0][2]
    out = bytearray(length)
    covered = 0
    for kind, _, payload in chunks:
        if kind == P.REPLY_TYPE_OFFSET_DATA:
            (o,) = struct.unpack_from(">Q", payload)
            data = payload[8:]
            out[o - offset : o - offset + len(data)] = data
            covered += len(data)
        elif kind == P.REPLY_TYPE_OFFSET_HOLE:
            o, n = struct.unpack(">QI", payload)
            assert n > 0
            out[o - offset : o - offset + n] = bytes(n)
            covered += n
        else:
            assert kind == P.REPLY_TYPE_NONE
    assert covered == length
    return bytes(out)


def connect(server, export: str = "top", *, structured: bool = True, contexts=()) -> Client:
    """A client in transmission on `export` of a Server (or of an address)."""
    c = Client(server.address if isinstance(server, nbd.Server) else server)
    if structured:
        c.structured_reply()
    if contexts:
        c.set_meta_context(export, *contexts)
    assert c.go(export) == P.REP_ACK
    return c
