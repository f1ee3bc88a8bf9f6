"""Loop devices and mounts of snapshot files, as the kernel reports them.

containerd attaches a loop device to a snapshot's FUSE file itself (mount option `loop`,
autoclear) and mounts the ext4 on it; the snapshotter never sees the device. These
helpers find it again from sysfs (`/sys/block/loop*/loop/backing_file`) and
`/proc/self/mountinfo`, to freeze a file system that is committed while mounted, to refuse
removing a mounted snapshot, and to clear what a killed daemon left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/block"
MOUNTINFO = "/proc/self/mountinfo"
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
LOOP_CLR_FD = 0x4C01


@dataclass(frozen=True)
class Loop:
    """An attached loop device: its name (`loop3`), `major:minor`, and backing file path."""

    name: str
    dev: str
    backing: str


def loops() -> list[Loop]:
    """Every attached loop device (those without a backing file are free)."""
    found = []
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(os.path.join(SYS_BLOCK, name, "loop", "backing_file")) as f:
                backing = f.read().rstrip("\n")
            with open(os.path.join(SYS_BLOCK, name, "dev")) as f:
                dev = f.read().strip()
        except OSError:
            continue
        found.append(Loop(name, dev, backing))
    return found


def backed_by(path: str) -> list[Loop]:
    """The loop devices whose backing file is `path` (a snapshot's file)."""
    return [lo for lo in loops() if lo.backing == path]


def under(directory: str) -> list[Loop]:
    """The loop devices whose backing file is in `directory` (the files of a FUSE mount,
    maybe one whose daemon died: the path stays in sysfs)."""
    prefix = directory.rstrip("/") + "/"
    return [lo for lo in loops() if lo.backing.startswith(prefix)]


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points(devices: Sequence[Loop]) -> list[str]:
    """Where `devices` are mounted in this process's mount namespace."""
    wanted = {lo.dev for lo in devices}
    if not wanted:
        return []
    points = []
    with open(MOUNTINFO) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] in wanted:
                points.append(_unescape(fields[4]))
    return points


@contextlib.contextmanager
def frozen(points: Sequence[str]) -> Iterator[None]:
    """File systems at `points` frozen (FIFREEZE) for the duration: writes are flushed through
    the loop device, the journal is checkpointed and new writes wait, so the bytes beneath
    are a clean file system. A mount that went away meanwhile is skipped."""
    thaw: list[int] = []
    try:
        for point in points:
            try:
                fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                log.warning("cannot open %s to freeze it: %s", point, exc)
                continue
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EBUSY:  # EBUSY: frozen already (by someone else)
                    raise
                continue
            thaw.append(fd)
        yield
    finally:
        for fd in thaw:
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as exc:
                log.warning("thawing a frozen file system failed: %s", exc)
            finally:
                os.close(fd)


def clear(devices: Sequence[Loop]) -> None:
    """Unmount (lazily) every mount of `devices` and detach them: left by a daemon that died,
    they can only fail (their FUSE connection is gone)."""
    for point in mount_points(devices):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for lo in devices:
        try:
            fd = os.open(f"/dev/{lo.name}", os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EBUSY):
                log.warning("detaching %s failed: %s", lo.name, exc)
        finally:
            os.close(fd)
