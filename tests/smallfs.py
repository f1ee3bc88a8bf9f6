"""A small ext4 file system on a loop device, and a filler that takes its free space: for tests
of what happens when the host disk is full."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.tools import unavailable

KiB, MiB = 1 << 10, 1 << 20


def _need_loop_mounts() -> None:
    missing = [t for t in ("mkfs.ext4", "mount", "umount") if shutil.which(t) is None]
    reason = f"missing {missing}" if missing else None if os.geteuid() == 0 else "loop mounts need root"
    if reason:
        unavailable(reason)


@contextlib.contextmanager
def small_fs(where: Path, size: int = 48 * MiB) -> Iterator[Path]:
    """A fresh ext4 of `size` bytes mounted through a loop device (detached again at unmount)."""
    _need_loop_mounts()
    image, mountpoint = where / "fs.img", where / "fs"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mountpoint: Path, leave: int = 0) -> Path:
    """Take all but about `leave` bytes of the file system's free space with a filler file."""
    filler = mountpoint / f"filler-{random.getrandbits(32):08x}"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        step = 1 * MiB
        while free_bytes(mountpoint) > leave + step:
            want = free_bytes(mountpoint) - leave
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, max(step, want // 2 // step * step))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        while leave == 0:
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, 4 * KiB)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler
