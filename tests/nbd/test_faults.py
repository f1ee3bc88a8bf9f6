"""The NBD server when the store cannot do what a client asks: a full host disk gives the
write or flush that does not fit ENOSPC and the connection goes on; a store that failed
(and must be reopened) answers with clean errors, never a traceback per connection."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import cowstore
from cowstore import nbd
from cowstore.nbd import proto as P
from tests.console import command, env
from tests.nbd.rawclient import Client, connect
from tests.smallfs import fill, small_fs

MiB = 1 << 20


def serve(store: Path, sock: Path, engine: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*command(), "--store", str(store), "serve", "--socket", str(sock)],
        env=env(engine),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.02)
    return proc


def test_a_full_disk_under_cowstore_serve_is_enospc_and_the_connection_goes_on(engine, tmp_path):
    with small_fs(tmp_path) as fs:
        with cowstore.open(fs / "store", create=True, chunk_size=64 << 10, engine=engine) as s:
            s.prepare("a", size=64 * MiB)
        proc = serve(fs / "store", tmp_path / "sock", engine)
        try:
            client = connect(str(tmp_path / "sock"), "a")
            filler = fill(fs, leave=6 * MiB)
            acknowledged: dict[int, bytes] = {}
            refused = 0
            for i in range(24):
                block = os.urandom(MiB)
                error = client.write(i * MiB, block)
                if error == 0:
                    acknowledged[i] = block
                else:
                    assert error == errno.ENOSPC
                    refused += 1
                if i % 4 == 3:
                    assert client.command(P.CMD_FLUSH) in (0, errno.ENOSPC)
            assert refused, "the file system never filled up"
            first = min(acknowledged)
            assert client.read(first * MiB, MiB) == acknowledged[first], "the connection is still usable"
            os.unlink(filler)
            for i in range(24, 28):
                block = os.urandom(MiB)
                assert client.write(i * MiB, block) == 0
                acknowledged[i] = block
            assert client.command(P.CMD_FLUSH) == 0
            client.send(P.CMD_DISC)
            client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert b"Traceback" not in err, err
        with cowstore.open(fs / "store", engine=engine) as s:
            assert s.check(data=True).ok
            vol = s.reader("a")
            for i, block in acknowledged.items():
                assert vol.pread(MiB, i * MiB) == block, f"acknowledged and flushed block {i} is lost"


def test_a_failed_store_gives_clean_errors_and_closes_connections(tmp_path, caplog):
    store = cowstore.open(tmp_path / "s", create=True, chunk_size=4096, engine="python")
    store.prepare("a", size=MiB).pwrite(b"x", 0)
    server = nbd.Server(store, socket_path=str(tmp_path / "sock"), shutdown_timeout=5).start_in_thread()
    try:
        client = connect(server, "a")

        def failing_fsync() -> None:
            raise OSError(errno.EIO, "Input/output error")

        store._engine.flush_data = failing_fsync
        assert client.write(0, b"y" * 100) == 0
        with caplog.at_level(logging.DEBUG, logger="cowstore.nbd"):
            assert client.command(P.CMD_FLUSH) == errno.EIO
            assert client.closed_by_server()
            for _ in range(3):
                again = Client(server.address)
                again.structured_reply()
                assert again.go("a") == P.REP_ERR_SHUTDOWN
                again.close()
        assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"
    finally:
        server.stop()
        store.close()


def test_a_read_only_store_exports_even_its_active_snapshots_read_only(engine, tmp_path):
    with cowstore.open(tmp_path / "s", create=True, chunk_size=4096, engine=engine) as s:
        s.prepare("a", size=MiB).pwrite(b"kept", 0)
    with (
        cowstore.open(tmp_path / "s", readonly=True, engine=engine) as store,
        nbd.Server(store, socket_path=str(tmp_path / "sock")).start_in_thread() as server,
    ):
        client = connect(server, "a")
        assert client.tflags & P.TFLAG_READ_ONLY
        assert client.write(0, b"lost") == errno.EPERM
        assert client.read(0, 4) == b"kept"
        client.close()
