"""Loop devices and mounts of snapshot files, as the kernel reports them.

The snapshotter attaches one loop device to a snapshot's FUSE file (`attach`: autoclear,
held open read-only by the daemon) and hands containerd the device, which mounts the ext4
on it. Holding the device open keeps its page cache and its attachment across the mounts of
one `ctr run` (ctr's own, then the shim's): no attach (LOOP_SET_STATUS64 freezes the queue,
tens of milliseconds) and no cold superblock and inode table reads through FUSE per mount.
Closing the held descriptor detaches the device once nothing mounts it (autoclear).
These helpers find devices again from sysfs (`/sys/block/loop*/loop/backing_file`) and
`/proc/self/mountinfo`, to freeze a file system that is committed while mounted, to refuse
removing a mounted snapshot, and to clear what a killed daemon left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/block"
MOUNTINFO = "/proc/self/mountinfo"
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LOOP_CONTROL = "/dev/loop-control"
ATTACH_TRIES = 16
"""Free devices tried in turn when another process takes the one found free first."""


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


@dataclass(frozen=True)
class Held:
    """A loop device this process attached and holds open (read-only): `path` `/dev/loopN`."""

    path: str
    fd: int


def _info64(flags: int, name: str) -> bytes:
    """`struct loop_info64`: only the flags and the file name (for sysfs) are set."""
    return struct.pack(
        "=QQQQQIIII64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0, flags, os.fsencode(name)[:63], b"", b"", 0, 0
    )


def _configure(device: int, backing: int, flags: int, name: str) -> None:
    """Bind `backing` to the device in one call (LOOP_CONFIGURE, Linux 5.8), else the two of
    older kernels."""
    try:
        fcntl.ioctl(device, LOOP_CONFIGURE, struct.pack("=II", backing, 0) + _info64(flags, name) + bytes(64))
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(device, LOOP_SET_FD, backing)
    try:
        fcntl.ioctl(device, LOOP_SET_STATUS64, _info64(flags, name))
    except BaseException:
        fcntl.ioctl(device, LOOP_CLR_FD, 0)
        raise


def attach(path: str, *, readonly: bool) -> Held:
    """A free loop device bound to the file `path` (autoclear; read-only for `readonly`),
    held open read-only by this process until `release`."""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if readonly else 0)
    backing = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(ATTACH_TRIES):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device_path = f"/dev/loop{number}"
                device = os.open(device_path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    try:
                        _configure(device, backing, flags, path)
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:  # taken meanwhile by someone else
                            continue
                        raise
                    # Held read-only: a writer would keep the kernel from mounting it when it
                    # refuses mounts of devices open for writing.
                    return Held(device_path, os.open(device_path, os.O_RDONLY | os.O_CLOEXEC))
                finally:
                    os.close(device)
            raise OSError(errno.EBUSY, f"no free loop device for {path} after {ATTACH_TRIES} tries")
        finally:
            os.close(control)
    finally:
        os.close(backing)


def attached(held: Held, path: str) -> bool:
    """Whether the device `held` is still bound to the file `path`."""
    try:
        with open(os.path.join(SYS_BLOCK, os.path.basename(held.path), "loop", "backing_file")) as f:
            return f.read().rstrip("\n") == path
    except OSError:
        return False


def release(held: Held) -> None:
    """Stop holding the device: it detaches now, or when its last mount goes."""
    os.close(held.fd)


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
