"""A store served as containerd's snapshotter, in process: FUSE files, the servicer on a
Unix socket, and a client stub over a real gRPC channel."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import cowstore
import cowstore.fuse

CHUNK = 64 << 10
SIZE = 64 << 20


def need_grpc() -> None:
    """Skip (fail in CI) without grpcio and protobuf (the `containerd` extra)."""
    try:
        import grpc  # noqa: F401

        import cowstore.containerd.service  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the containerd extra (grpcio, protobuf): {exc}")
        pytest.skip(f"grpcio or protobuf missing: {exc}")


def need_fuse_root() -> None:
    """Skip (fail in CI) unless FUSE, e2fsprogs and root are there."""
    missing = [t for t in ("fusermount3", "mkfs.ext4", "debugfs") if shutil.which(t) is None]
    problem = f"{', '.join(missing)} not installed" if missing else None
    if problem is None and os.geteuid() != 0:
        problem = "loop devices and mounts need root"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


@dataclass
class Served:
    """The store, its FUSE mount point, the socket and a client of the Snapshots service."""

    store: cowstore.Store
    files: Path
    socket: Path
    stub: object  # snapshots_pb2_grpc.SnapshotsStub

    def file(self, key: str) -> Path:
        return self.files / cowstore.fuse.file_name(key)

    def backing(self, device: str) -> Path:
        """The file the loop device `device` (a Mount's source) is attached to."""
        return Path((Path("/sys/block") / Path(device).name / "loop" / "backing_file").read_text().strip())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    need_grpc()
    need_fuse_root()
    import grpc

    from cowstore.containerd import service
    from cowstore.containerd.api import snapshots_pb2_grpc
    from cowstore.containerd.snapshotter import Snapshotter

    store = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, default_size=SIZE)
    files = tmp_path / "files"
    files.mkdir()
    mount = cowstore.fuse.mount(store, str(files))
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    snapshotter = Snapshotter(store, str(files))
    service.add_to_server(service.Servicer(snapshotter), server)
    sock = tmp_path / "snapshots.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield Served(store, files, sock, snapshots_pb2_grpc.SnapshotsStub(channel))
    finally:
        channel.close()
        server.stop(None).wait()
        snapshotter.close()
        mount.close()
        store.close()
