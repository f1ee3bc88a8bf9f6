"""Loop devices and mounts of snapshot files: the kernel side of a snapshot, done from a
helper process so that the daemon never waits on its own FUSE files.

The rule: the daemon serves the FUSE mount whose files back the loop devices, so no thread of
it may make a syscall that the kernel answers by asking that FUSE mount (opening or statting a
snapshot file, LOOP_CONFIGURE, which statfs-es the file, FIFREEZE/FITHAW of a file system on
such a loop device, the last close of the device). Killed (SIGKILL) while such a request is
out, the waiting thread is uninterruptible and the daemon's /dev/fuse descriptor, whose release
would abort the connection, goes only once that thread exits: a zombie that never dies. So
each such call runs in a helper process (`Helpers`: this file run as a script); a call
stuck on FUSE there is freed by the connection abort when the daemon dies. The daemon only
reads sysfs and mountinfo, and holds the loop device's descriptor (a block device: holding
it asks FUSE nothing; its last close is done by the helper, `release`).

The snapshotter attaches one loop device to a snapshot's FUSE file (`attach`: autoclear,
held open read-only by the daemon) and hands containerd the device, which mounts the ext4
on it. Holding the device open keeps its page cache and its attachment across the mounts of
one `ctr run` (ctr's own, then the shim's): no attach (LOOP_SET_STATUS64 freezes the queue,
tens of milliseconds) and no cold superblock and inode table reads through FUSE per mount.
Closing the held descriptor detaches the device once nothing mounts it (autoclear).
The functions here find devices again from sysfs (`/sys/block/loop*/loop/backing_file`) and
`/proc/self/mountinfo`, to freeze a file system that is committed while mounted, to refuse
removing a mounted snapshot, and to clear what a killed daemon left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import traceback
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


def _attach_here(path: str, readonly: bool) -> Held:
    """`attach`, in the helper: the device, and a descriptor holding it open read-only."""
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


HELPER_TIMEOUT = 600.0
"""Seconds a helper may take (a freeze flushes every dirty page of the file system)."""
MAX_PASSED = 200
"""Descriptors handed to one helper (the kernel passes at most 253 in a message)."""


class Helpers:
    """The helper process, for the calls that may ask our FUSE mount: this file run as a
    script (stdlib only), one thread per call. Started once, it costs about a millisecond
    a call, where starting Python for each cost fifty.

    Each call sends the helper process a request (`OP\\0ARG...`, with one end of a fresh
    socket pair and any descriptors the call needs); its thread answers on that socket and
    closes it when done. The process exits when this object closes, or this process dies:
    a thread of it stuck on our FUSE mount is then freed by the connection abort.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: subprocess.Popen[bytes] | None = None
        self._requests: socket.socket | None = None

    def __enter__(self) -> Helpers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the helper process, once its calls are done."""
        with self._lock:
            server, requests = self._server, self._requests
            self._server = self._requests = None
        if requests is not None:
            requests.close()
        if server is not None:
            server.wait(HELPER_TIMEOUT)

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._server = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self._requests = ours
        return ours

    def _send(self, request: bytes, fds: list[int]) -> None:
        """Hand a request to the helper process, starting it (again, if it died) first."""
        for attempt in (1, 2):
            with self._lock:
                requests = self._requests or self._start()
                try:
                    socket.send_fds(requests, [request], fds)
                    return
                except (BrokenPipeError, ConnectionResetError):
                    if attempt == 2:
                        raise
                    requests.close()
                    self._requests = None
                    if self._server is not None:
                        self._server.wait(HELPER_TIMEOUT)

    @contextlib.contextmanager
    def _exchange(self, op: str, *args: str, fds: Sequence[int] = ()) -> Iterator[socket.socket]:
        """The helper running `op` with `args` (and `fds`), and our end of the call's socket;
        on leaving, our end is shut for writing (the call's end-of-file) and the call's end
        (its closing the other end) awaited."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            with theirs:
                self._send("\0".join((op, *args)).encode(), [theirs.fileno(), *fds])
            try:
                yield ours
            finally:
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_WR)
                ours.settimeout(HELPER_TIMEOUT)
                while ours.recv(65536):
                    pass

    def _call(self, op: str, *args: str, fds: int = 0, passing: Sequence[int] = ()) -> tuple[str, list[int]]:
        """Run `op` with `args` in a helper, handing it `passing`; returns its answer and the
        `fds` descriptors it passed back (SCM_RIGHTS); its failure is raised as the OSError
        it met."""
        with self._exchange(op, *args, fds=passing) as ours:
            message, received, _, _ = socket.recv_fds(ours, 65536, max(fds, 1))
        for fd in received:
            os.set_inheritable(fd, False)  # SCM_RIGHTS descriptors arrive without close-on-exec
        status, _, text = message.decode(errors="replace").partition(" ")
        if status != "ok" or len(received) != fds:
            for fd in received:
                os.close(fd)
            if status == "ok":
                status, text = str(errno.EIO), f"passed {len(received)} descriptors, not {fds}"
            _raise(status, text, f"{op} {' '.join(args)}")
        return text, received

    def attach(self, path: str, *, readonly: bool) -> Held:
        """A free loop device bound to the file `path` (autoclear; read-only for `readonly`),
        held open read-only by this process until `release`. A helper opens the file and
        binds it, then passes the device's descriptor back."""
        device, fds = self._call("attach", path, "ro" if readonly else "rw", fds=1)
        return Held(device, fds[0])

    def release(self, *held: Held, wait: bool = True) -> None:
        """Stop holding the devices: each detaches now, or when its last mount goes. The
        helper is handed them and closes them last: a last close flushes and detaches the
        device. Without `wait`, this returns once the helper has them (`close` waits)."""
        if not held:
            return
        fds = [h.fd for h in held]
        try:
            for first in range(0, len(fds), MAX_PASSED):
                batch = fds[first : first + MAX_PASSED]
                if wait:
                    self._call("release", passing=batch)
                else:
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    with ours, theirs:  # nobody reads the answer
                        self._send(b"release", [theirs.fileno(), *batch])
        finally:
            for fd in fds:
                os.close(fd)

    @contextlib.contextmanager
    def frozen(self, points: Sequence[str]) -> Iterator[None]:
        """File systems at `points` frozen (FIFREEZE) for the duration: writes are flushed
        through the loop device, the journal is checkpointed and new writes wait, so the
        bytes beneath are a clean file system. A mount that went away meanwhile, or one
        frozen already (by someone else), is skipped. A helper freezes them and thaws them
        at its end-of-file: when we are done, or dead (a killed daemon leaves nothing frozen)."""
        if not points:
            yield
            return
        with self._exchange("freeze", *points) as ours:
            message = ours.recv(65536)
            status, _, text = message.decode(errors="replace").partition(" ")
            if status != "ok":
                _raise(status, text, f"freeze {' '.join(points)}")
            if text:
                log.warning("not freezing: %s", text)
            yield

    def clear(self, devices: Sequence[Loop]) -> None:
        """Unmount (lazily) every mount of `devices` and detach them: left by a daemon that
        died, they can only fail (their FUSE connection is gone). A helper detaches them."""
        for point in mount_points(devices):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        if devices:
            answer, _ = self._call("clear", *(lo.name for lo in devices))
            if answer:
                log.warning("detaching loop devices: %s", answer)


def _raise(status: str, text: str, what: str) -> None:
    """The helper's failure as the OSError it met (`ERRNO MESSAGE`), or as EIO if it said nothing."""
    if status.isdigit():
        raise OSError(int(status), text)
    raise OSError(errno.EIO, f"the loop helper ({what}) ended without an answer")


# -- the helpers' side: stdlib only ---------------------------------------------------------


def _freeze_here(answer: socket.socket, points: Sequence[str]) -> None:
    """Freeze `points`, answer `ok NOTES`, wait for end-of-file (the daemon done, or dead),
    thaw what it froze."""
    frozen: list[int] = []
    notes = []
    try:
        for point in points:
            try:
                fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                notes.append(f"cannot open {point}: {exc}")
                continue
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EBUSY:
                    raise
                notes.append(f"{point} is frozen already")
                continue
            frozen.append(fd)
        answer.send(f"ok {'; '.join(notes)}".encode())
        answer.recv(1)
    finally:
        for fd in frozen:
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as exc:
                print(f"cowstore loop helper: thawing failed: {exc}", file=sys.stderr)
            os.close(fd)


def _clear_here(*names: str) -> str:
    failed = []
    for name in names:
        try:
            fd = os.open(f"/dev/{name}", os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EBUSY):
                failed.append(f"{name}: {exc}")
        finally:
            os.close(fd)
    return "; ".join(failed)


def _help(op: str, answer: socket.socket, args: list[str], fds: list[int]) -> None:
    """One helper's work: answer `ok TEXT` (and descriptors), or `ERRNO MESSAGE`. The
    descriptors handed over (`fds`) and passed back are closed here once done with."""
    passed: list[int] = []
    try:
        if op == "attach":
            held = _attach_here(args[0], args[1] == "ro")
            text, passed = held.path, [held.fd]
        elif op == "freeze":
            _freeze_here(answer, args)
            return
        elif op == "clear":
            text = _clear_here(*args)
        elif op == "release":
            text = ""  # the `finally` below closes them: the point of the request
        else:
            raise OSError(errno.EINVAL, f"no helper operation {op!r}")
        socket.send_fds(answer, [f"ok {text}".encode()], passed)
    except OSError as exc:
        with contextlib.suppress(OSError):
            answer.send(f"{exc.errno or errno.EIO} {exc.strerror or exc}".encode())
    finally:
        for fd in fds + passed:
            os.close(fd)


def _helper_thread(message: bytes, fds: list[int]) -> None:
    try:
        op, *args = message.decode().split("\0")
        with socket.socket(fileno=fds[0]) as answer:
            _help(op, answer, args, fds[1:])
    except BaseException:
        traceback.print_exc()


def _serve(requests: socket.socket) -> None:
    """The helper process: a thread per request until end-of-file (the daemon gone)."""
    while True:
        message, fds, _, _ = socket.recv_fds(requests, 65536, MAX_PASSED + 1)
        if not message:
            for fd in fds:
                os.close(fd)
            return
        # Not daemon threads: the process exits once every call is done (`Helpers.close`).
        threading.Thread(target=_helper_thread, args=(message, fds)).start()


if __name__ == "__main__":
    with socket.socket(fileno=int(sys.argv[1])) as requests:
        _serve(requests)
