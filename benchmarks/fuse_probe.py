"""A quick probe of FUSE options: one snapshot's file, served in-process by `cowstore.fuse`
(options from `_cserver.TUNING`, changed with --tune) or by nbdfuse over `cowstore serve`.

    python -m benchmarks.fuse_probe --server cserver --tune direct_io=1 fio ext4-dio
    python -m benchmarks.fuse_probe --server nbdfuse fio ext4-dio ext4-buffered

Workloads: `fio` (psync, 4 jobs: 4 KiB randread and randwrite with direct=1, 1 MiB
sequential read with and without direct), `ext4-dio` and `ext4-buffered` (ext4 on a loop
device over the file, `losetup --direct-io=on` / off: 1 GiB written then fsync'd, read back
after dropping caches). Needs root, fio, fusermount3, losetup, mkfs.ext4 (and nbdfuse for
the peer). It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cowstore
import cowstore.fuse

KEY = "vol"
"""The filled snapshot fio runs on."""
FS_KEY = "fs"
"""The empty snapshot, twice the size of what is written, that ext4 goes on."""
GiB = 1 << 30
MiB = 1 << 20


def fill(store: cowstore.Store, size: int) -> None:
    """Write every byte of the snapshot (incompressible-looking, distinct per MiB), so reads
    hit data, then flush."""
    block = bytearray(os.urandom(MiB))
    with store.mounts(KEY) as v:
        for i in range(size // MiB):
            block[:8] = i.to_bytes(8, "little")
            v.pwrite(block, i * MiB)
    store.flush()


@contextlib.contextmanager
def served_in_process(directory: Path, mountpoint: Path, key: str, tune: dict[str, int]) -> Iterator[Path]:
    from cowstore.fuse import _cserver  # type: ignore[attr-defined]

    saved = dict(_cserver.TUNING)
    _cserver.TUNING.update(tune)
    store = cowstore.open(directory)
    try:
        with cowstore.fuse.mount(store, str(mountpoint)):
            yield mountpoint / key
    finally:
        _cserver.TUNING.clear()
        _cserver.TUNING.update(saved)
        store.close()


@contextlib.contextmanager
def served_by_nbdfuse(directory: Path, mountpoint: Path, key: str, connections: int = 4) -> Iterator[Path]:
    """`cowstore serve` on a unix socket, and nbdfuse (foreground; -P says when it is ready)."""
    sock = directory.parent / "nbd.sock"
    pidfile = directory.parent / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    serve = subprocess.Popen(
        [sys.executable, "-m", "cowstore", "--store", str(directory), "serve", "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if sock.exists():
                break
            time.sleep(0.05)
        uri = f"nbd+unix:///{key}?socket={sock}"
        command = ["nbdfuse", "-C", str(connections), "-P", str(pidfile), str(mountpoint / key), uri]
        nbdfuse = subprocess.Popen(command)
        try:
            for _ in range(600):
                if pidfile.exists() or nbdfuse.poll() is not None:
                    break
                time.sleep(0.05)
            yield mountpoint / key
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            nbdfuse.wait(60)
    finally:
        serve.terminate()
        serve.wait(60)


def fio(path: Path, name: str, rw: str, bs: str, direct: int, runtime: int, size: int) -> str:
    out = subprocess.run(
        ["fio", f"--name={name}", f"--filename={path}", "--ioengine=psync", "--numjobs=4", f"--rw={rw}",
         f"--bs={bs}", f"--direct={direct}", f"--size={size}", f"--runtime={runtime}", "--time_based",
         "--group_reporting", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return f"{name}: {side['iops']:.0f} IOPS, {side['bw_bytes'] / MiB:.0f} MiB/s"


def fio_suite(path: Path, runtime: int, size: int) -> list[str]:
    return [
        fio(path, "randread-4k-direct", "randread", "4k", 1, runtime, size),
        fio(path, "randwrite-4k-direct", "randwrite", "4k", 1, runtime, size),
        fio(path, "read-1m-direct", "read", "1m", 1, runtime, size),
        fio(path, "read-1m-buffered", "read", "1m", 0, runtime, size),
    ]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def ext4(path: Path, work: Path, *, direct_io: bool, amount: int) -> list[str]:
    """ext4 on a loop device over `path`: write `amount` bytes and fsync, then read them cold."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    mnt = work / "ext4"
    mnt.mkdir(exist_ok=True)
    results = []
    try:
        dio = Path(f"/sys/block/{Path(loop).name}/loop/dio").read_text().strip()
        lazy = "lazy_itable_init=0,lazy_journal_init=0"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", lazy, loop], check=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            block = bytearray(os.urandom(MiB))
            start = time.perf_counter()
            fd = os.open(mnt / "data", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for i in range(amount // MiB):
                    block[:8] = i.to_bytes(8, "little")
                    os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            took = time.perf_counter() - start
            results.append(f"ext4 (loop dio={dio}) write+fsync: {amount / MiB / took:.0f} MiB/s")
            drop_caches()
            start = time.perf_counter()
            with open(mnt / "data", "rb", buffering=0) as f:
                while f.read(MiB):
                    pass
            took = time.perf_counter() - start
            results.append(f"ext4 (loop dio={dio}) cold read: {amount / MiB / took:.0f} MiB/s")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["fio", "ext4-dio", "ext4-buffered"])
    parser.add_argument("--server", choices=["cserver", "nbdfuse"], default="cserver")
    parser.add_argument("--tune", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--size", type=int, default=GiB)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--ext4-bytes", type=int, default=GiB)
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    args = parser.parse_args(argv)
    tune = {k: int(v) for k, v in (item.split("=", 1) for item in args.tune)}
    with tempfile.TemporaryDirectory(prefix="fuse-probe-", dir=args.dir) as tmp:
        work = Path(tmp)
        directory = work / "store"
        with cowstore.open(directory, create=True, chunk_size=64 << 10, default_size=args.size) as store:
            store.prepare(KEY)
            fill(store, args.size)
            store.prepare(FS_KEY, size=2 * args.ext4_bytes)
        mountpoint = work / "mnt"
        mountpoint.mkdir()
        label = args.server + "".join(f" {k}={v}" for k, v in tune.items())
        for workload in args.workloads:
            key = KEY if workload == "fio" else FS_KEY
            serve = (
                served_in_process(directory, mountpoint, key, tune)
                if args.server == "cserver"
                else served_by_nbdfuse(directory, mountpoint, key)
            )
            with serve as path:
                if workload == "fio":
                    lines = fio_suite(path, args.runtime, args.size)
                else:
                    lines = ext4(path, work, direct_io=workload == "ext4-dio", amount=args.ext4_bytes)
            for line in lines:
                print(f"[{label}] {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
