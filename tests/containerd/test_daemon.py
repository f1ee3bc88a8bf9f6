"""`cowstore serve --containerd PATH`: the socket (mode 0600, a stale one replaced, a live
one refused), the FUSE mount it implies (STORE/files unless --mount), a clean stop."""

from __future__ import annotations

import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containerd.conftest import need_fuse_root, need_grpc

TIMEOUT = 60


def cowstore(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cowstore", "--store", str(store), *args]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    need_grpc()
    need_fuse_root()
    path = tmp_path / "store"
    subprocess.run(cowstore(path, "init", "--default-size", "64M"), check=True, capture_output=True)
    return path


@pytest.fixture
def daemon(store: Path, tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Daemons a test starts, stopped (SIGTERM, then SIGKILL) at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve(started: list[subprocess.Popen[str]], store: Path, *args: str) -> subprocess.Popen[str]:
    """Start `cowstore serve` and wait until it says the API is served."""
    proc = subprocess.Popen(
        cowstore(store, "serve", *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started.append(proc)
    assert proc.stdout is not None
    said = []
    for line in proc.stdout:
        if line.startswith("serving containerd's snapshots API"):
            return proc
        said.append(line)
    proc.wait(TIMEOUT)
    raise AssertionError(f"cowstore serve exited with {proc.returncode} before serving: {''.join(said)}")


def test_serve_containerd(store: Path, daemon: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    import grpc

    from cowstore.containerd.api import snapshots_pb2 as pb
    from cowstore.containerd.api import snapshots_pb2_grpc

    sock = tmp_path / "snapshots.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody accepts on: a killed daemon's
    proc = serve(daemon, store, "--containerd", str(sock))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert not any(p.name.startswith(".cowstore-") for p in tmp_path.iterdir())
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        (m,) = stub.Prepare(pb.PrepareSnapshotRequest(key="default/1/a b:c"), timeout=TIMEOUT).mounts
        backing = Path("/sys/block", Path(m.source).name, "loop", "backing_file").read_text().strip()
        assert backing == str(store / "files" / "default%2F1%2Fa%20b%3Ac")
        assert os.path.getsize(backing) == 64 << 20
        with pytest.raises(grpc.RpcError) as info:
            stub.Stat(pb.StatSnapshotRequest(key="missing"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The other commands go through the daemon meanwhile.
    ls = subprocess.run(cowstore(store, "ls"), capture_output=True, text=True, timeout=TIMEOUT)
    assert "default/1/a b:c" in ls.stdout
    # A second daemon on the same socket is refused (the store is held too).
    second = subprocess.run(
        cowstore(store, "serve", "--containerd", str(sock), "--wait", "0"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert second.returncode != 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert not sock.exists()
    assert not os.path.ismount(store / "files")


def test_a_live_socket_is_refused(store: Path, daemon: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    sock = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(sock))
        live.listen()
        files = tmp_path / "files"
        files.mkdir()
        proc = subprocess.run(
            cowstore(store, "serve", "--containerd", str(sock), "--mount", str(files)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert proc.returncode != 0 and "in use" in proc.stderr, proc.stderr
    assert not os.path.ismount(files)


def test_restart_clears_what_a_killed_daemon_left(
    store: Path, daemon: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """SIGKILL with a snapshot mounted through a loop device: the next daemon clears the dead
    FUSE mount, the ext4 mount and the loop device, and serves again."""
    import grpc

    from cowstore.containerd.api import snapshots_pb2 as pb
    from cowstore.containerd.api import snapshots_pb2_grpc

    sock, files, target = tmp_path / "s.sock", tmp_path / "files", tmp_path / "rootfs"
    files.mkdir()
    target.mkdir()
    proc = serve(daemon, store, "--containerd", str(sock), "--mount", str(files))
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        (m,) = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr"), timeout=TIMEOUT).mounts
    device = m.source  # the daemon's loop device on the snapshot's file
    try:
        subprocess.run(["mount", "-t", "ext4", device, str(target)], check=True)
        proc.kill()
        proc.wait(TIMEOUT)
        serve(daemon, store, "--containerd", str(sock), "--mount", str(files))
        assert not os.path.ismount(target)
        backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file")
        assert not backing.exists() or not backing.read_text().startswith(str(files))
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            assert stub.Stat(pb.StatSnapshotRequest(key="ctr"), timeout=TIMEOUT).info.kind == pb.ACTIVE
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


def test_bad_requests_to_the_serving_daemon_get_containerd_codes_and_it_goes_on(
    store: Path, daemon: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Through `cowstore serve --containerd` itself: unknown keys NOT_FOUND, a parent that is not
    committed, a bad filter and a label flood INVALID_ARGUMENT; the daemon serves on."""
    import grpc

    from cowstore.containerd.api import snapshots_pb2 as pb
    from cowstore.containerd.api import snapshots_pb2_grpc

    sock = tmp_path / "s.sock"
    serve(daemon, store, "--containerd", str(sock))
    Code = grpc.StatusCode
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)

        def code(method: str, request: object) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                result = getattr(stub, method)(request, timeout=TIMEOUT)
                if method == "List":
                    list(result)
            return info.value.code()

        for method, request in [
            ("Stat", pb.StatSnapshotRequest(key="missing")),
            ("Mounts", pb.MountsRequest(key="missing")),
            ("Remove", pb.RemoveSnapshotRequest(key="missing")),
            ("Usage", pb.UsageRequest(key="missing")),
            ("Commit", pb.CommitSnapshotRequest(name="c", key="missing")),
            ("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="missing"))),
            ("Prepare", pb.PrepareSnapshotRequest(key="p", parent="missing")),
            ("View", pb.ViewSnapshotRequest(key="v", parent="missing")),
        ]:
            assert code(method, request) == Code.NOT_FOUND, method
        stub.Prepare(pb.PrepareSnapshotRequest(key="active"), timeout=TIMEOUT)
        stub.View(pb.ViewSnapshotRequest(key="view"), timeout=TIMEOUT)
        for parent in ("active", "view"):
            assert code("Prepare", pb.PrepareSnapshotRequest(key="p", parent=parent)) == Code.INVALID_ARGUMENT
            assert code("View", pb.ViewSnapshotRequest(key="v", parent=parent)) == Code.INVALID_ARGUMENT
        assert code("Commit", pb.CommitSnapshotRequest(name="c", key="view")) == Code.FAILED_PRECONDITION
        for bad in ("kind===", "name~=(", 'labels."open'):
            assert code("List", pb.ListSnapshotsRequest(filters=[bad])) == Code.INVALID_ARGUMENT, bad
        flood = {f"k{i}": "v" for i in range(5000)}
        assert code("Prepare", pb.PrepareSnapshotRequest(key="f", labels=flood)) == Code.INVALID_ARGUMENT
        assert (
            code("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="active", labels=flood)))
            == Code.INVALID_ARGUMENT
        )
        names = sorted(
            i.name for batch in stub.List(pb.ListSnapshotsRequest(), timeout=TIMEOUT) for i in batch.info
        )
        assert names == ["active", "view"]


KILLS = 6
"""Rounds of `test_sigkill_mid_attach_or_freeze_never_leaves_an_unkillable_daemon`."""
DEATH_TIMEOUT = 5.0


def _churn(stub: Any, pb: Any, target: Path, stop: threading.Event) -> None:
    """Until the daemon dies: Prepare and Mounts (a loop attach), mount, write unsynced data,
    Commit while mounted (a freeze that flushes it through FUSE), unmount, Remove."""
    import grpc

    n = 0
    try:
        while not stop.is_set():
            n += 1
            key = f"churn-{n}-{random.randrange(1 << 30)}"
            (m,) = stub.Prepare(pb.PrepareSnapshotRequest(key=key), timeout=TIMEOUT).mounts
            stub.Mounts(pb.MountsRequest(key=key), timeout=TIMEOUT)
            if subprocess.run(["mount", "-t", "ext4", m.source, str(target)], capture_output=True).returncode:
                return
            try:
                with open(target / "data", "wb") as f:
                    f.write(os.urandom(8 << 20))
                stub.Commit(pb.CommitSnapshotRequest(name=f"{key}-c", key=key), timeout=TIMEOUT)
            finally:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
            stub.Remove(pb.RemoveSnapshotRequest(key=f"{key}-c"), timeout=TIMEOUT)
    except (grpc.RpcError, OSError):
        return


def test_sigkill_mid_attach_or_freeze_never_leaves_an_unkillable_daemon(
    store: Path, daemon: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """SIGKILL at random moments of Prepare/Mounts (loop attach) and Commit of a mounted
    snapshot (freeze): the daemon is gone within seconds each time (it never waits on its
    own FUSE files, which would leave it an unkillable zombie), and the next one serves."""
    import grpc

    from cowstore.containerd.api import snapshots_pb2 as pb
    from cowstore.containerd.api import snapshots_pb2_grpc
    from cowstore.fuse import kernel

    sock, files, target = tmp_path / "s.sock", tmp_path / "files", tmp_path / "rootfs"
    files.mkdir()
    target.mkdir()
    rng = random.Random(0)
    try:
        for _ in range(KILLS):
            proc = serve(daemon, store, "--containerd", str(sock), "--mount", str(files))
            stop = threading.Event()
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                stub = snapshots_pb2_grpc.SnapshotsStub(channel)
                worker = threading.Thread(target=_churn, args=(stub, pb, target, stop))
                worker.start()
                time.sleep(rng.uniform(0.05, 1.5))
                proc.kill()
                try:
                    proc.wait(DEATH_TIMEOUT)
                except subprocess.TimeoutExpired:
                    conn = kernel.connection(str(files))
                    if conn is not None:
                        kernel.abort(conn)  # free the stuck thread, so the test can clean up
                    proc.wait(TIMEOUT)
                    raise AssertionError(
                        "the killed daemon outlived SIGKILL: it waited on its own FUSE"
                    ) from None
                finally:
                    stop.set()
                    worker.join(TIMEOUT)
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        proc = serve(daemon, store, "--containerd", str(sock), "--mount", str(files))
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            stub.Prepare(pb.PrepareSnapshotRequest(key="after"), timeout=TIMEOUT)
            assert stub.Stat(pb.StatSnapshotRequest(key="after"), timeout=TIMEOUT).info.kind == pb.ACTIVE
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
