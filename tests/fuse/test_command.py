"""`cowstore mount` as users run it: in the foreground until unmounted, SIGTERM or SIGINT;
one process per store; a killed one leaves a consistent store and a dead mount point that
`fusermount3 -u` (or the next `cowstore mount`) clears."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import cowstore
from cowstore.fuse import file_name, kernel
from tests import console
from tests.tools import need

MiB = 1 << 20
KEY = "default/1/rw sha256:ab"


@pytest.fixture
def cli(engine: str, tmp_path: Path):
    """Runs `cowstore --store STORE ...` with the engine under test."""
    need("fusermount3")
    store = tmp_path / "store"

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*console.command(), "--store", str(store), "--wait", "0", *args],
            env=console.env(engine),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode:
            raise AssertionError(f"cowstore {args} exit {proc.returncode}: {proc.stderr}")
        return proc

    def start(mountpoint: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*console.command(), "--store", str(store), "--wait", "0", "mount", str(mountpoint)],
            env=console.env(engine),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("mounted "):
            proc.kill()
            raise AssertionError(f"cowstore mount printed {line!r}: {proc.communicate()[1]}")
        return proc

    run("init", "--chunk-size", "64K", "--default-size", "16M")
    run("prepare", KEY)
    run("prepare", "base")
    run("commit", "layer", "base")
    run.start = start  # type: ignore[attr-defined]
    run.store = store  # type: ignore[attr-defined]
    return run


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if kernel.is_mounted(str(path)):
        kernel.detach(str(path), lazy=True)


def stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_mount_serves_files_until_a_signal_then_unmounts_and_flushes(cli, mountpoint, sig):
    proc = cli.start(mountpoint)
    try:
        assert sorted(os.listdir(mountpoint)) == sorted([file_name(KEY), "layer"])
        data = os.urandom(MiB)
        fd = os.open(mountpoint / file_name(KEY), os.O_WRONLY)
        try:
            os.pwrite(fd, data, 5 * MiB)
        finally:
            os.close(fd)
    finally:
        code, err = stop(proc, sig)
    assert code == 0, err
    assert not kernel.is_mounted(str(mountpoint))
    with cowstore.open(cli.store) as store, store.mounts(KEY) as vol:
        assert vol.pread(MiB, 5 * MiB) == data


def test_mount_ends_when_unmounted_from_outside(cli, mountpoint):
    proc = cli.start(mountpoint)
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""


def test_second_mount_of_the_same_store_is_refused_as_locked(cli, mountpoint, tmp_path):
    proc = cli.start(mountpoint)
    try:
        other = tmp_path / "other"
        other.mkdir()
        second = cli("--json", "mount", str(other), check=False)
        assert second.returncode == 1
        error = json.loads(second.stderr)["error"]
        assert error["kind"] == "Locked", error
        assert f"process {proc.pid} serves it" in error["message"], error
        assert not kernel.is_mounted(str(other))
    finally:
        assert stop(proc, signal.SIGTERM)[0] == 0


def test_mount_point_that_is_not_a_directory_is_a_usage_error(cli, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    proc = cli("mount", str(tmp_path / "file"), check=False)
    assert proc.returncode != 0
    assert "not a directory" in proc.stderr


def test_sigkill_leaves_a_consistent_store_with_fsynced_data_and_a_mount_point_fusermount_clears(
    cli, mountpoint
):
    proc = cli.start(mountpoint)
    data = os.urandom(2 * MiB)
    fd = os.open(mountpoint / file_name(KEY), os.O_WRONLY)
    try:
        os.pwrite(fd, data, MiB)
        os.fsync(fd)
        proc.kill()
        proc.wait(timeout=30)
        with pytest.raises(OSError) as dead:
            os.pwrite(fd, b"x" * 4096, 0)
        assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    finally:
        # The kernel's FLUSH at close fails on a dead connection; the descriptor goes anyway.
        with contextlib.suppress(OSError):
            os.close(fd)
    with pytest.raises(OSError) as stale:
        os.statvfs(mountpoint)  # never answered from the kernel's attribute cache, as stat may be
    assert stale.value.errno == errno.ENOTCONN
    check = cli("check")
    assert "No errors were found" in check.stdout, check.stdout
    with cowstore.open(cli.store) as store, store.mounts(KEY) as vol:
        assert vol.pread(2 * MiB, MiB) == data
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert not kernel.is_mounted(str(mountpoint))
    assert os.listdir(mountpoint) == []


def test_mount_on_a_dead_mount_point_clears_it_first(cli, mountpoint):
    proc = cli.start(mountpoint)
    proc.kill()
    proc.wait(timeout=30)
    again = cli.start(mountpoint)
    try:
        assert file_name(KEY) in os.listdir(mountpoint)
    finally:
        assert stop(again, signal.SIGTERM)[0] == 0
    assert not kernel.is_mounted(str(mountpoint))
