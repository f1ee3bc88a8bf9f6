"""The kernel side of a FUSE mount: attach a mount point to a /dev/fuse descriptor,
detach it, end a connection that outlives its mount point, and clear dead mounts.

Both servers (the Cython one over libfuse and the pure-Python one) serve a descriptor
that this module hands them, so that mounting and unmounting are done once, here, the
same way for both: through `fusermount3`, which works for root and for users alike.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import time

from ..errors import FailedPrecondition, InvalidArgument

FUSECTL = "/sys/fs/fuse/connections"
FSNAME = "cowstore"


def _fusermount() -> str:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise FailedPrecondition("fusermount3 is not installed (apt-get install fuse3)")
    return tool


def attach(mountpoint: str, *, max_read: int, allow_other: bool | None = None) -> int:
    """Mount a FUSE file system on `mountpoint`; returns the /dev/fuse descriptor to serve.

    Nothing under the mount point may be looked at until a server answers the kernel's
    INIT, so callers resolve the path (`os.path.realpath`) before, not after.

    `allow_other` defaults to true for root (the kernel's loop driver and containerd open
    the files as root, which a mount without it refuses to anyone but its owner).
    """
    mountpoint = os.path.realpath(mountpoint)
    clear_stale(mountpoint)
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise InvalidArgument(f"mount point {mountpoint} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"mount point {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise FailedPrecondition(f"{mountpoint} is already a mount point")
    if allow_other is None:
        allow_other = os.geteuid() == 0
    options = [f"fsname={FSNAME}", f"subtype={FSNAME}", f"max_read={max_read}", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        done = subprocess.run(
            [_fusermount(), "-o", ",".join(options), "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        theirs.close()
        if done.returncode != 0:
            raise FailedPrecondition(
                f"cannot mount {mountpoint}: {done.stderr.strip() or f'fusermount3 exit {done.returncode}'}"
            )
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise FailedPrecondition(f"cannot mount {mountpoint}: fusermount3 passed no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def is_mounted(path: str) -> bool:
    """Whether the resolved `path` is the root of a mount (alive or not)."""
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == path for line in f)


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def connection(path: str) -> int | None:
    """The FUSE connection number of the mount on the resolved `path` (its device's minor),
    None if there is no FUSE mount there."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == path and fields[sep + 1].startswith("fuse"):
                return int(fields[2].split(":")[1])
    return None


def detach(mountpoint: str, *, lazy: bool = False) -> bool:
    """Unmount; true if done. Without `lazy` a busy mount stays (false)."""
    args = [_fusermount(), "-u", "-q"] + (["-z"] if lazy else []) + ["--", os.path.abspath(mountpoint)]
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return done.returncode == 0


def abort(conn: int) -> bool:
    """End FUSE connection `conn` at once (its requests fail with ENOTCONN); needs root to
    mount fusectl if it is not mounted. True if the connection is gone."""
    path = f"{FUSECTL}/{conn}/abort"
    if not os.path.exists(path) and os.geteuid() == 0 and not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def clear_stale(mountpoint: str) -> bool:
    """Unmount a dead FUSE mount on `mountpoint` (its server was killed); true if one was.

    Probed with statfs, which always asks the server: a stat may be answered from the
    kernel's attribute cache for a while after the server died."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
        detach(mountpoint, lazy=True)
        for _ in range(100):
            try:
                os.stat(mountpoint)
                return True
            except OSError as again:
                if again.errno != errno.ENOTCONN:
                    return True
            time.sleep(0.01)
        return True
    return False
