"""The NBD server against the raw-socket client of `rawclient`, byte by byte from proto.md."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import cowstore
from cowstore import errors, nbd
from cowstore.nbd import proto as P
from tests.data import pattern
from tests.nbd.chain import CHUNK, Chain
from tests.nbd.rawclient import TIMEOUT, Client, assemble, connect

SIZE = 4 * 1024 * 1024


@pytest.fixture
def store() -> Iterator[cowstore.Store]:
    s = cowstore.memory(chunk_size=CHUNK, default_size=SIZE)
    yield s
    s.close()


@pytest.fixture
def chain(store):
    """The store holding a `Chain`: base <- mid <- top (active), and midview, a view of mid."""
    Chain(store, SIZE)
    return store


@pytest.fixture
def server(chain) -> Iterator[nbd.Server]:
    srv = nbd.Server(chain, port=0, shutdown_timeout=5).start_in_thread()
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    c = Client(server.address)
    yield c
    c.close()


# -- handshake ---------------------------------------------------------------


def test_handshake_offers_fixed_newstyle_and_no_zeroes(client):
    assert client.handshake_flags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES


def test_unknown_client_flags_close_the_connection(server):
    c = Client(server.address, flags=1 << 7)
    assert c.closed_by_server()


def test_wrong_option_magic_closes_the_connection(client):
    client.sock.sendall(struct.pack(">QII", 0x1234, P.OPT_LIST, 0))
    assert client.closed_by_server()


def test_list_names_active_and_view_snapshots_but_not_committed_ones(client):
    replies = client.option(P.OPT_LIST)
    assert replies[-1] == (P.REP_ACK, b"")
    names = [payload[4 : 4 + P.U32.unpack_from(payload)[0]].decode() for _, payload in replies[:-1]]
    assert sorted(names) == ["midview", "top"]


def test_list_with_data_is_invalid(client):
    assert client.option(P.OPT_LIST, b"x")[-1][0] == P.REP_ERR_INVALID


def test_exports_argument_limits_the_list_and_names_the_default_export(chain):
    with nbd.Server(chain, exports=["midview"], port=0) as srv:
        srv.start_in_thread()
        c = Client(srv.address)
        names = [p[4:].decode() for r, p in c.option(P.OPT_LIST) if r == P.REP_SERVER]
        assert names == ["midview"]
        assert c.info("top")[0] == P.REP_ERR_UNKNOWN
        reply, infos = c.info("")
        assert reply == P.REP_ACK
        assert infos[P.INFO_NAME] == b"midview"
        c.close()


def test_info_reports_size_flags_name_description_and_block_size(client, store):
    reply, infos = client.info("top", P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE)
    assert reply == P.REP_ACK
    assert client.size == SIZE
    assert infos[P.INFO_NAME] == b"top"
    assert b"active" in infos[P.INFO_DESCRIPTION]
    assert struct.unpack(">III", infos[P.INFO_BLOCK_SIZE]) == (1, store.chunk_size, 32 * 1024 * 1024)
    want = (
        P.TFLAG_HAS_FLAGS
        | P.TFLAG_SEND_FLUSH
        | P.TFLAG_SEND_FUA
        | P.TFLAG_SEND_TRIM
        | P.TFLAG_SEND_WRITE_ZEROES
        | P.TFLAG_SEND_FAST_ZERO
        | P.TFLAG_SEND_CACHE
        | P.TFLAG_CAN_MULTI_CONN
    )
    assert client.tflags == want
    # INFO does not end negotiation: more options still work.
    assert client.option(P.OPT_LIST)[-1][0] == P.REP_ACK


def test_view_is_advertised_read_only(client):
    client.structured_reply()
    assert client.info("midview")[0] == P.REP_ACK
    assert client.tflags & P.TFLAG_READ_ONLY
    assert client.tflags & P.TFLAG_SEND_DF
    assert not client.tflags & (P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES)


def test_unknown_or_committed_export_is_err_unknown(client):
    assert client.info("nope")[0] == P.REP_ERR_UNKNOWN
    assert client.info("")[0] == P.REP_ERR_UNKNOWN
    assert client.go("base") == P.REP_ERR_UNKNOWN
    assert client.go("top") == P.REP_ACK


def test_malformed_info_is_invalid(client):
    assert client.option(P.OPT_INFO, P.U32.pack(100) + b"top" + P.U16.pack(0))[-1][0] == P.REP_ERR_INVALID


def test_unknown_option_is_err_unsup_and_negotiation_continues(client):
    assert client.option(99, b"whatever")[-1][0] == P.REP_ERR_UNSUP
    assert client.option(P.OPT_EXTENDED_HEADERS)[-1][0] == P.REP_ERR_UNSUP
    assert client.option(P.OPT_STARTTLS)[-1][0] == P.REP_ERR_POLICY
    assert client.go("top") == P.REP_ACK


def test_oversized_option_is_too_big_and_negotiation_continues(client):
    assert client.option(P.OPT_INFO, bytes(nbd.MAX_OPTION + 1))[-1][0] == P.REP_ERR_TOO_BIG
    assert client.go("top") == P.REP_ACK


def test_abort_is_acknowledged_then_the_connection_closes(client):
    assert client.option(P.OPT_ABORT) == [(P.REP_ACK, b"")]
    assert client.closed_by_server()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(server, no_zeroes):
    flags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
    c = Client(server.address, flags=flags)
    c.send_option(P.OPT_EXPORT_NAME, b"top")
    size, tflags = P.EXPORT_NAME_REPLY.unpack(c.recv(P.EXPORT_NAME_REPLY.size))
    assert size == SIZE and tflags & P.TFLAG_HAS_FLAGS
    if not no_zeroes:
        assert c.recv(124) == bytes(124)
    assert c.read(0, 16) == pattern(16, 1)
    c.close()


def test_export_name_of_unknown_export_closes_the_connection(client):
    client.send_option(P.OPT_EXPORT_NAME, b"nope")
    assert client.closed_by_server()


def test_structured_reply_with_data_is_invalid(client):
    assert client.option(P.OPT_STRUCTURED_REPLY, b"x")[-1][0] == P.REP_ERR_INVALID


def test_set_meta_context_needs_structured_replies(client):
    replies, _ = client.set_meta_context("top", "base:allocation")
    assert replies[-1][0] == P.REP_ERR_INVALID


def test_list_meta_context_lists_both_contexts_and_namespace_wildcards(client):
    client.structured_reply()
    _, found = client.set_meta_context("top", option=P.OPT_LIST_META_CONTEXT)
    assert set(found) == {"base:allocation", "qemu:allocation-depth"}
    _, found = client.set_meta_context("top", "qemu:", option=P.OPT_LIST_META_CONTEXT)
    assert set(found) == {"qemu:allocation-depth"}
    _, found = client.set_meta_context("top", "base:", "x-other:thing", option=P.OPT_LIST_META_CONTEXT)
    assert set(found) == {"base:allocation"}


def test_set_meta_context_selects_named_contexts_and_ignores_unknown_ones(client):
    client.structured_reply()
    replies, found = client.set_meta_context(
        "top", "base:allocation", "qemu:allocation-depth", "base:nope", "x:y"
    )
    assert replies[-1][0] == P.REP_ACK
    assert sorted(found.values()) == ["base:allocation", "qemu:allocation-depth"]
    assert len(set(found)) == 2
    replies, _ = client.set_meta_context("nope", "base:allocation")
    assert replies[-1][0] == P.REP_ERR_UNKNOWN


# -- commands ----------------------------------------------------------------


def test_write_then_read_with_simple_replies(server, chain):
    c = connect(server, structured=False)
    data = pattern(10_000, 9)
    assert c.write(12_345, data) == 0
    assert c.read(12_345, len(data)) == data
    want = bytearray(pattern(2 * CHUNK, 1))
    want[12_345 : 12_345 + len(data)] = data
    assert c.read(0, 2 * CHUNK) == want
    assert chain.mounts("top").pread(len(data), 12_345) == data
    assert chain.mounts("midview").pread(2 * CHUNK, 0) == pattern(2 * CHUNK, 1)
    c.close()


def test_structured_read_sends_holes_for_unallocated_ranges(server):
    c = connect(server)
    c.send(P.CMD_READ, 0, 6 * CHUNK, cookie=7)
    cookie, error, chunks = c.reply()
    assert (cookie, error) == (7, 0)
    kinds = [k for k, _, _ in chunks]
    assert kinds == [
        P.REPLY_TYPE_OFFSET_DATA,
        P.REPLY_TYPE_OFFSET_HOLE,
        P.REPLY_TYPE_OFFSET_DATA,
        P.REPLY_TYPE_OFFSET_HOLE,
    ]
    assert [f & P.REPLY_FLAG_DONE for _, f, _ in chunks] == [0, 0, 0, P.REPLY_FLAG_DONE]
    want = pattern(2 * CHUNK, 1) + pattern(CHUNK, 2) + bytes(CHUNK) + pattern(CHUNK, 3) + bytes(CHUNK)
    assert assemble(chunks, 0, 6 * CHUNK) == want
    c.close()


def test_structured_read_with_df_sends_one_data_chunk(server):
    c = connect(server)
    c.send(P.CMD_READ, CHUNK, 3 * CHUNK, flags=P.CMD_FLAG_DF)
    _, error, chunks = c.reply()
    assert error == 0
    assert [(k, f) for k, f, _ in chunks] == [(P.REPLY_TYPE_OFFSET_DATA, P.REPLY_FLAG_DONE)]
    assert assemble(chunks, CHUNK, 3 * CHUNK) == pattern(2 * CHUNK, 1)[CHUNK:] + pattern(CHUNK, 2) + bytes(
        CHUNK
    )
    c.close()


def test_zero_length_read_succeeds_without_data(server):
    c = connect(server)
    c.send(P.CMD_READ, 0, 0)
    _, error, chunks = c.reply()
    assert error == 0 and [k for k, _, _ in chunks] == [P.REPLY_TYPE_NONE]
    c.close()


def test_flush_fua_trim_write_zeroes_and_cache(server, chain):
    c = connect(server)
    assert c.write(CHUNK, b"\xff" * 3 * CHUNK, flags=P.CMD_FLAG_FUA) == 0
    assert c.command(P.CMD_FLUSH) == 0
    assert c.command(P.CMD_TRIM, CHUNK, CHUNK, flags=P.CMD_FLAG_FUA) == 0
    assert c.command(P.CMD_WRITE_ZEROES, 2 * CHUNK + 100, 200, flags=P.CMD_FLAG_NO_HOLE) == 0
    assert c.command(P.CMD_WRITE_ZEROES, 3 * CHUNK, CHUNK, flags=P.CMD_FLAG_FAST_ZERO) == 0
    assert c.command(P.CMD_CACHE, 0, SIZE) == 0
    got = c.read(0, 4 * CHUNK)
    assert got[:CHUNK] == pattern(CHUNK, 1)
    assert got[CHUNK : 2 * CHUNK] == bytes(CHUNK)
    assert got[2 * CHUNK : 3 * CHUNK] == b"\xff" * 100 + bytes(200) + b"\xff" * (CHUNK - 300)
    assert got[3 * CHUNK :] == bytes(CHUNK)
    # The committed parent is untouched.
    assert chain.mounts("midview").pread(3 * CHUNK, 0) == pattern(2 * CHUNK, 1) + pattern(CHUNK, 2)
    c.close()


def test_large_write_and_read_cross_every_buffer_size(server):
    c = connect(server)
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert c.write(1000, data) == 0
    assert c.read(1000, len(data), flags=P.CMD_FLAG_DF) == data
    assert c.read(1000, len(data)) == data
    c.close()


def test_pipelined_requests_are_all_answered(server):
    c = connect(server)
    blocks = {i: pattern(4096, i) for i in range(64)}
    payload = b"".join(
        P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1000 + i, i * 4096, 4096) + blocks[i] for i in blocks
    )
    payload += b"".join(
        P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2000 + i, i * 4096, 4096) for i in blocks
    )
    c.sock.sendall(payload)
    seen = {}
    for _ in range(128):
        cookie, error, chunks = c.reply()
        assert error == 0
        seen[cookie] = chunks
    assert set(seen) == {1000 + i for i in blocks} | {2000 + i for i in blocks}
    for i in blocks:
        assert assemble(seen[2000 + i], i * 4096, 4096) == blocks[i]
    c.close()


def test_thousands_of_pipelined_requests_in_one_burst_are_all_answered(server):
    c = connect(server)
    requests = []
    for i in range(3000):
        if i % 10 == 0:
            requests.append(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, (i % 64) * 1024, 4096))
        else:
            requests.append(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_CACHE, i, 0, 4096))
    sender = threading.Thread(target=c.sock.sendall, args=(b"".join(requests),))
    sender.start()
    want = pattern(2 * CHUNK, 1)
    for _ in range(3000):
        cookie, error, chunks = c.reply()
        assert error == 0
        if cookie % 10 == 0:
            offset = (cookie % 64) * 1024
            assert assemble(chunks, offset, 4096) == want[offset : offset + 4096]
    sender.join(TIMEOUT)
    c.close()


def test_block_status_reports_allocation_and_depth_of_a_three_layer_chain(server):
    c = connect(server, contexts=("base:allocation", "qemu:allocation-depth"))
    status = c.block_status(0, SIZE)
    hole = P.STATE_HOLE | P.STATE_ZERO
    assert status["base:allocation"] == [(3 * CHUNK, 0), (CHUNK, hole), (CHUNK, 0), (SIZE - 5 * CHUNK, hole)]
    assert status["qemu:allocation-depth"] == [
        (2 * CHUNK, 3),
        (CHUNK, 2),
        (CHUNK, 0),
        (CHUNK, 1),
        (SIZE - 5 * CHUNK, 0),
    ]
    unaligned = c.block_status(100, 2 * CHUNK)
    assert unaligned["qemu:allocation-depth"] == [(2 * CHUNK - 100, 3), (100, 2)]
    c.close()


def test_block_status_req_one_returns_one_extent_per_context(server):
    c = connect(server, contexts=("base:allocation", "qemu:allocation-depth"))
    status = c.block_status(0, 4 * CHUNK, flags=P.CMD_FLAG_REQ_ONE)
    assert status == {"base:allocation": [(3 * CHUNK, 0)], "qemu:allocation-depth": [(2 * CHUNK, 3)]}
    status = c.block_status(0, 1000, flags=P.CMD_FLAG_REQ_ONE)
    assert status["base:allocation"] == [(1000, 0)]
    c.close()


def test_block_status_of_a_view_counts_depth_from_the_view(server):
    c = connect(server, "midview", contexts=("qemu:allocation-depth",))
    assert c.block_status(0, 4 * CHUNK)["qemu:allocation-depth"] == [(2 * CHUNK, 3), (CHUNK, 2), (CHUNK, 0)]
    c.close()


def test_block_status_without_a_context_is_einval(server):
    c = connect(server)
    assert c.command(P.CMD_BLOCK_STATUS, 0, CHUNK) == P.EINVAL
    c.close()


def test_contexts_set_for_another_export_do_not_carry_over(server):
    c = Client(server.address)
    c.structured_reply()
    c.set_meta_context("midview", "base:allocation")
    assert c.go("top") == P.REP_ACK
    assert c.command(P.CMD_BLOCK_STATUS, 0, CHUNK) == P.EINVAL
    c.close()


# -- errors ------------------------------------------------------------------


def test_read_beyond_the_end_is_einval(server):
    c = connect(server)
    assert c.command(P.CMD_READ, SIZE - 10, 20) == P.EINVAL
    assert c.command(P.CMD_READ, 1 << 62, 1) == P.EINVAL
    assert c.command(P.CMD_CACHE, SIZE, 1) == P.EINVAL
    assert c.command(P.CMD_TRIM, SIZE, 1) == P.EINVAL
    assert c.read(0, 8) == pattern(8, 1)
    c.close()


def test_read_beyond_the_end_with_simple_replies_is_einval_without_data(server):
    c = connect(server, structured=False)
    c.send(P.CMD_READ, SIZE, 4096)
    assert c.reply(4096)[1] == P.EINVAL
    assert c.read(0, 8) == pattern(8, 1)
    c.close()


def test_write_beyond_the_end_is_enospc(server):
    c = connect(server)
    assert c.write(SIZE - 10, b"x" * 20) == P.ENOSPC
    assert c.command(P.CMD_WRITE_ZEROES, SIZE, 1) == P.ENOSPC
    assert c.read(SIZE - 10, 10) == bytes(10)
    c.close()


def test_lengths_over_32_mib_are_einval(server, chain):
    chain.prepare("big", size=2 * nbd.MAX_PAYLOAD)
    c = connect(server, "big")
    c.send(P.CMD_READ, 0, nbd.MAX_PAYLOAD + 1)
    _, error, chunks = c.reply()
    assert error == P.EINVAL
    assert [k for k, _, _ in chunks] == [P.REPLY_TYPE_ERROR]
    (msg_len,) = struct.unpack_from(">H", chunks[0][2], 4)
    assert b"maximum" in chunks[0][2][6 : 6 + msg_len]
    big = nbd.MAX_PAYLOAD + 4096
    c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 5, 0, big))
    chunk = bytes(1 << 20)
    sent = 0
    while sent < big:
        n = min(len(chunk), big - sent)
        c.sock.sendall(chunk[:n])
        sent += n
    assert c.reply()[:2] == (5, P.EINVAL)
    assert c.read(0, 8) == bytes(8)
    assert c.write(0, b"ok") == 0
    c.close()


def test_a_full_pool_is_enospc_and_trimming_makes_room(tmp_path):
    s = cowstore.memory(chunk_size=CHUNK, default_size=SIZE, max_bytes=4 * CHUNK)
    s.prepare("vol")
    with nbd.Server(s, port=0) as srv:
        srv.start_in_thread()
        c = connect(srv, "vol")
        for i in range(4):
            assert c.write(i * CHUNK, b"\x01" * CHUNK) == 0
        assert c.write(4 * CHUNK, b"\x02" * CHUNK) == P.ENOSPC
        assert c.read(0, 4) == b"\x01" * 4
        assert c.command(P.CMD_TRIM, 0, CHUNK) == 0
        assert c.write(4 * CHUNK, b"\x02" * CHUNK) == 0
        assert c.read(4 * CHUNK, CHUNK) == b"\x02" * CHUNK
        c.close()
    s.close()


def test_writes_to_a_view_are_eperm(server, chain):
    c = connect(server, "midview")
    assert c.write(0, b"nope") == P.EPERM
    assert c.command(P.CMD_TRIM, 0, CHUNK) == P.EPERM
    assert c.command(P.CMD_WRITE_ZEROES, 0, CHUNK) == P.EPERM
    assert c.command(P.CMD_FLUSH) == 0
    assert c.read(0, 4) == pattern(4, 1)
    assert chain.mounts("midview").pread(4, 0) == pattern(4, 1)
    c.close()


def test_unknown_commands_and_flags_are_einval(server):
    c = connect(server)
    assert c.command(42, 0, 0) == P.EINVAL
    assert c.command(P.CMD_FLUSH, flags=P.CMD_FLAG_REQ_ONE) == P.EINVAL
    assert c.command(P.CMD_READ, 0, 8, flags=1 << 9) == P.EINVAL
    assert c.read(0, 8) == pattern(8, 1)
    c.close()


def test_df_without_structured_replies_is_einval(server):
    c = connect(server, structured=False)
    c.send(P.CMD_READ, 0, 8, flags=P.CMD_FLAG_DF)
    assert c.reply(8)[1] == P.EINVAL
    c.close()


def test_wrong_request_magic_closes_only_that_connection(server):
    bad = connect(server)
    good = connect(server)
    bad.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, P.CMD_READ, 1, 0, 8))
    assert bad.closed_by_server()
    assert good.read(0, 8) == pattern(8, 1)
    good.close()


def test_a_client_vanishing_mid_request_leaves_the_server_serving(server, chain):
    gone = connect(server)
    gone.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 8 * CHUNK, 1 << 20) + b"\xee" * 5000)
    gone.sock.close()
    half = connect(server)
    half.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 8)[:10])
    half.sock.close()
    after = connect(server)
    assert after.read(8 * CHUNK, 5000) == bytes(5000)
    assert after.write(0, b"still here") == 0
    assert chain.mounts("top").pread(10, 0) == b"still here"
    after.close()


def test_disc_ends_the_connection_after_earlier_requests(server, chain):
    c = connect(server)
    c.sock.sendall(
        P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4)
        + b"abcd"
        + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 2, 0, 0)
    )
    assert c.reply()[:2] == (1, 0)
    assert c.closed_by_server()
    assert chain.mounts("top").pread(4, 0) == b"abcd"


def test_committed_export_reports_eshutdown_on_later_requests(store):
    store.prepare("a", size=SIZE)
    with nbd.Server(store, port=0) as srv:
        srv.start_in_thread()
        c = connect(srv, "a")
        assert c.write(0, b"x") == 0
        store.commit("done", "a")
        assert c.write(0, b"y") == P.ESHUTDOWN
        c.close()
        assert Client(srv.address).info("a")[0] == P.REP_ERR_UNKNOWN


def test_an_export_whose_size_is_not_a_chunk_multiple_works_to_the_last_byte(store):
    size = 3 * CHUNK + 1001
    store.prepare("odd", size=size)
    with nbd.Server(store, port=0) as srv:
        srv.start_in_thread()
        c = connect(srv, "odd", contexts=("base:allocation",))
        assert c.size == size
        assert c.write(size - 1500, b"\x42" * 1500) == 0
        assert c.read(size - 2000, 2000) == bytes(500) + b"\x42" * 1500
        assert c.read(0, size)[-1500:] == b"\x42" * 1500
        status = c.block_status(0, size)["base:allocation"]
        assert sum(n for n, _ in status) == size
        assert status[-1] == (CHUNK + 1001, 0)
        assert c.command(P.CMD_WRITE_ZEROES, size - 1, 1) == 0
        assert c.write(size, b"x") == P.ENOSPC
        c.close()


# -- many clients, lifecycle -------------------------------------------------


def in_threads(work: Callable[[int], None], count: int) -> None:
    """Run `work(0)` to `work(count - 1)` at once, each on its own thread; re-raise the first failure."""
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[0]


def test_many_clients_write_and_read_at_once(server, chain):
    def work(i: int) -> None:
        c = connect(server)
        for j in range(20):
            data = pattern(5000, i * 31 + j)
            offset = 8 * CHUNK + i * 6 * CHUNK + j * 1000
            assert c.write(offset, data) == 0
            assert c.read(offset, 5000) == data
        c.close()

    in_threads(work, 8)
    c = connect(server)
    assert c.read(0, 8) == pattern(8, 1)
    c.close()


def test_a_non_loopback_host_needs_allow_remote(store):
    with pytest.raises(errors.InvalidArgument):
        nbd.Server(store, host="0.0.0.0", port=0)
    with pytest.raises(errors.InvalidArgument):
        nbd.Server(store, host="", port=0)
    nbd.Server(store, host="0.0.0.0", port=0, allow_remote=True).stop()
    nbd.Server(store, host="localhost", port=0).stop()


def test_a_stopped_server_cannot_serve_again(store):
    srv = nbd.Server(store, port=0).start_in_thread()
    with pytest.raises(errors.FailedPrecondition):
        srv.start_in_thread()
    srv.stop()
    srv.stop()
    again = nbd.Server(store, port=0)
    again.stop()
    with pytest.raises(errors.FailedPrecondition):
        again.start_in_thread()


def test_unix_socket_serving_replaces_a_stale_socket_file(chain):
    directory = tempfile.mkdtemp(prefix="nbd")
    path = os.path.join(directory, "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    with nbd.Server(chain, socket_path=path) as srv:
        srv.start_in_thread()
        assert srv.address == path
        c = connect(srv)
        assert c.read(0, 4) == pattern(4, 1)
        c.close()
    assert not os.path.exists(path)
    os.rmdir(directory)


def test_stop_lets_connected_clients_finish_and_flushes(tmp_path):
    s = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK)
    s.prepare("vol", size=SIZE)
    srv = nbd.Server(s, port=0).start_in_thread()
    c = connect(srv, "vol")
    assert c.write(0, b"kept") == 0
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 5
    assert c.closed_by_server()
    with pytest.raises(OSError):
        Client(srv.address)
    s.close()
    with cowstore.open(tmp_path / "store") as again:
        assert again.mounts("vol").pread(4, 0) == b"kept"


SERVE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import cowstore
    from cowstore import nbd
    store = cowstore.open(sys.argv[1])
    nbd.serve(store, socket_path=sys.argv[2])
    os._exit(0)  # no store.close(): whatever survives was flushed by serve()
    """
)


@contextlib.contextmanager
def serving_process(path: Path, kill: int = signal.SIGKILL) -> Iterator[tuple[str, subprocess.Popen]]:
    """`nbd.serve` of the store at `path` in a child process; yields its socket path and process.

    On leaving, the child gets `kill` unless it already exited.
    """
    directory = tempfile.mkdtemp(prefix="nbd")
    sock_path = os.path.join(directory, "s")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(path), sock_path], env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock_path):
            assert proc.poll() is None, "the server exited early"
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.05)
        yield sock_path, proc
        proc.send_signal(kill)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(sock_path)
        os.rmdir(directory)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_cleanly_on_signal_and_flushes(tmp_path, sig):
    path = tmp_path / "store"
    with cowstore.open(path, create=True, chunk_size=CHUNK) as s:
        s.prepare("vol", size=SIZE)
    with serving_process(path, sig) as (sock_path, proc):
        c = connect(sock_path, "vol")
        assert c.write(CHUNK, b"durable") == 0
    assert proc.returncode == 0
    assert c.closed_by_server()
    with cowstore.open(path) as s:
        assert s.mounts("vol").pread(7, CHUNK) == b"durable"


def test_flush_and_fua_from_several_connections_survive_sigkill_of_the_server(tmp_path):
    path = tmp_path / "store"
    with cowstore.open(path, create=True, chunk_size=CHUNK) as s:
        s.prepare("vol", size=SIZE)
    with serving_process(path) as (sock_path, _):

        def work(i: int) -> None:
            c = connect(sock_path, "vol")
            for j in range(5):
                assert c.write((i * 5 + j) * 4096, pattern(4096, i * 5 + j)) == 0
                assert c.command(P.CMD_FLUSH) == 0
            assert c.write(32 * CHUNK + i * 4096, pattern(4096, 99), flags=P.CMD_FLAG_FUA) == 0

        in_threads(work, 4)
    with cowstore.open(path) as s:
        v = s.mounts("vol")
        for k in range(20):
            assert v.pread(4096, k * 4096) == pattern(4096, k)
        for i in range(4):
            assert v.pread(4096, 32 * CHUNK + i * 4096) == pattern(4096, 99)


def test_a_flush_after_pipelined_writes_answers_once_all_of_them_are_durable(tmp_path):
    """A client that sends a burst of writes and a FLUSH without waiting gets the FLUSH's
    reply after the writes' replies, and everything it covers survives a SIGKILL of the
    server right after it; likewise a FUA write at the end of a burst. The writes land in a
    fresh layer on a parent, mostly in chunks an earlier write of the burst made partial."""
    path = tmp_path / "store"
    with cowstore.open(path, create=True, chunk_size=CHUNK) as s:
        s.prepare("base", size=SIZE).pwrite(pattern(SIZE, 1), 0)
        s.commit("base-1", "base")
        s.prepare("vol", "base-1")
    model = bytearray(pattern(SIZE, 1))
    blocks = [(k * 7919) % (SIZE // 4096) for k in range(96)]
    with serving_process(path) as (sock_path, _):
        c = connect(sock_path, "vol")
        burst = b""
        for cookie, block in enumerate(blocks[:64], start=1):
            data = pattern(4096, 100 + cookie)
            model[block * 4096 : block * 4096 + 4096] = data
            burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, cookie, block * 4096, 4096) + data
        burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 1000, 0, 0)
        c.sock.sendall(burst)
        cookies = [c.reply()[:2] for _ in range(65)]
        assert cookies[-1] == (1000, 0)
        assert sorted(cookies[:-1]) == [(k, 0) for k in range(1, 65)]
        burst = b""
        for cookie, block in enumerate(blocks[64:], start=65):
            data = pattern(4096, 100 + cookie)
            model[block * 4096 : block * 4096 + 4096] = data
            flags = P.CMD_FLAG_FUA if cookie == len(blocks) else 0
            burst += P.REQUEST.pack(P.REQUEST_MAGIC, flags, P.CMD_WRITE, cookie, block * 4096, 4096) + data
        c.sock.sendall(burst)
        assert sorted(c.reply()[:2] for _ in blocks[64:]) == [(k, 0) for k in range(65, len(blocks) + 1)]
    with cowstore.open(path) as s:
        assert s.mounts("vol").pread(SIZE, 0) == model
