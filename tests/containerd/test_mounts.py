"""Snapshots as ext4 mounted through loop devices, as containerd mounts them: a commit while
mounted freezes the file system (the committed layer is clean), a mounted snapshot is not
removed, and loop devices a dead daemon left on our files are cleared."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containerd.conftest import Served
from tests.containerd.test_service import call, fails

grpc = pytest.importorskip("grpc")

DISCARD_TIMEOUT = 10.0
"""Seconds ext4 may take to discard blocks a committed transaction freed (it does so after
the commit, in the background)."""


@contextlib.contextmanager
def mounted(m: Any, target: Path) -> Iterator[Path]:
    """`m` (a Mount message: the snapshotter's loop device) mounted on `target`, as containerd does."""
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_commit_while_mounted_freezes_a_clean_layer(served: Served, tmp_path: Path) -> None:
    (m,) = call(served, "Prepare", key="layer").mounts
    with mounted(m, tmp_path / "rw") as root:
        (root / "hello").write_text("written, not synced\n")
        (root / "dir").mkdir(mode=0o700)
        call(served, "Commit", name="committed", key="layer")
        # A mounted snapshot that is gone: its file answers ESTALE; nothing else breaks.
    layer = served.store.reader("committed")
    image = tmp_path / "committed.img"
    with layer.file() as f, open(image, "wb") as out:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    (v,) = call(served, "View", key="view", parent="committed").mounts
    with mounted(v, tmp_path / "ro") as root:
        assert (root / "hello").read_text() == "written, not synced\n"
        assert sorted(p.name for p in root.iterdir()) == ["dir", "hello"]
        with pytest.raises(OSError):
            (root / "new").write_text("x")
    call(served, "Remove", key="view")


def test_files_deleted_in_a_mounted_snapshot_give_their_chunks_back_at_once(
    served: Served, tmp_path: Path
) -> None:
    (m,) = call(served, "Prepare", key="layer").mounts
    with mounted(m, tmp_path / "rw") as root:
        base = served.store.usage("layer").size
        (root / "big").write_bytes(os.urandom(32 << 20))
        os.sync()
        written = served.store.usage("layer").size
        assert written >= base + (32 << 20)
        (root / "big").unlink()
        os.sync()  # commits the freeing; ext4 discards the blocks just after
        deadline = time.monotonic() + DISCARD_TIMEOUT
        while served.store.usage("layer").size > base + (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.store.usage("layer").size <= base + (1 << 20)
    call(served, "Remove", key="layer")


def test_a_child_prepared_larger_than_its_parent_mounts_with_the_bigger_file_system(
    served: Served, tmp_path: Path
) -> None:
    label = "containerd.io/snapshot/cowstore.size"
    (m,) = call(served, "Prepare", key="layer").mounts
    with mounted(m, tmp_path / "rw") as root:
        (root / "from-parent").write_text("parent's file\n")
        before = shutil.disk_usage(root).total
        call(served, "Commit", name="image", key="layer")
    (m,) = call(served, "Prepare", key="bigger", parent="image", labels={label: "256M"}).mounts
    assert served.store.stat("bigger").size == 256 << 20
    with mounted(m, tmp_path / "big") as root:
        assert (root / "from-parent").read_text() == "parent's file\n"
        after = shutil.disk_usage(root).total
        df = subprocess.run(["df", "-B1", "--output=size", str(root)], capture_output=True, text=True)
        assert int(df.stdout.split()[-1]) == after
        assert after > 3 * before
        (root / "past-the-old-end").write_bytes(os.urandom(100 << 20))  # more than the parent held
    call(served, "Commit", name="grown", key="bigger")
    assert served.store.stat("grown").size == 256 << 20
    (v,) = call(served, "View", key="look", parent="grown").mounts
    with mounted(v, tmp_path / "ro") as root:
        assert (root / "past-the-old-end").stat().st_size == 100 << 20


def test_a_mounted_snapshot_is_not_removed(served: Served, tmp_path: Path) -> None:
    (m,) = call(served, "Prepare", key="busy").mounts
    with mounted(m, tmp_path / "rw"):
        assert "remove" in fails(served, grpc.StatusCode.FAILED_PRECONDITION, "Remove", key="busy")
    call(served, "Remove", key="busy")


def test_loop_devices_left_on_our_files_are_cleared(served: Served, tmp_path: Path) -> None:
    from cowstore.containerd import loop

    call(served, "Prepare", key="left")
    held = {lo.name for lo in loop.under(str(served.files))}  # the snapshotter's own device
    target = tmp_path / "left"
    target.mkdir()
    # A device as a killed daemon leaves it: attached to one of our files, mounted, held by nobody.
    device = subprocess.run(
        ["losetup", "--find", "--show", str(served.file("left"))], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["mount", "-t", "ext4", device, str(target)], check=True)
    found = [lo for lo in loop.under(str(served.files)) if lo.name not in held]
    assert [lo.name for lo in found] == [Path(device).name]
    assert loop.mount_points(found) == [str(target)]
    with loop.Helpers() as helpers:
        helpers.clear(found)
    assert {lo.name for lo in loop.under(str(served.files))} == held
    assert loop.mount_points(found) == []
