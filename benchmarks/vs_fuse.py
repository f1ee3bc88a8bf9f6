"""Snapshots as files over FUSE: `cowstore mount` against qemu-storage-daemon's FUSE export
of the same chain as qcow2, and against nbdfuse over `cowstore serve` on the same store.

One chain (default 32 layers over a 1 GiB volume, 64 KiB chunks and clusters, as
benchmarks/vs_qemu.py builds it) with a fresh top (depth 33). Every run starts its own
servers after `sync`; the contenders alternate (A B C A B C …, `--pairs` rounds, medians):

- fio `psync`, 4 jobs, O_DIRECT where the file allows it: 4 KiB random reads of the top,
  4 KiB random writes into a fresh top (a new one every run), 1 MiB sequential reads;
- ext4 on a loop device over the file of a fresh, empty snapshot (cowstore mount and
  nbdfuse only): `--ext4-bytes` written and fsynced, then read back after dropping caches.

Results go to benchmarks/results/ (the `vs_fuse` section of latest.json and latest.md).
Usage: `python benchmarks/vs_fuse.py [--quick]`; `--help` for the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers, results
from benchmarks.workload import CowChain, Layout, QcowChain
from benchmarks.workload import run as run_tool
from cowstore.fuse import file_name, kernel
from cowstore.units import GiB, KiB, MiB, parse_size

CONTENDERS = ("cowstore", "qemu-storage-daemon", "nbdfuse")
EXT4_CONTENDERS = ("cowstore", "nbdfuse")
TOOLS = ("qemu-img", "qemu-io", "qemu-storage-daemon", "nbdfuse", "fio", "fusermount3", "mkfs.ext4")
START_TIMEOUT = 60.0
Log = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    """What to build and how long to measure."""

    size: int = 1 * GiB
    chunk: int = 64 * KiB
    chain: int = 32
    pairs: int = 3
    runtime: float = 3.0
    ramp: float = 1.0
    numjobs: int = 4
    jobs: tuple[str, ...] | None = None
    ext4_bytes: int = 1 * GiB
    ext4_pairs: int = 3
    engine: str | None = None


FULL = Config()
QUICK = Config(size=256 * MiB, chain=8, runtime=2.0, ramp=0.5, ext4_bytes=256 * MiB)


def jobs(numjobs: int) -> list[peers.FioJob]:
    return [
        peers.FioJob(f"randread-4k-psync-x{numjobs}", "randread", "4k", 1, numjobs),
        peers.FioJob(f"randwrite-4k-psync-x{numjobs}", "randwrite", "4k", 1, numjobs),
        peers.FioJob(f"read-1m-psync-x{numjobs}", "read", "1m", 1, numjobs),
    ]


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _wait_for(done: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not done():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not come up within {START_TIMEOUT} s")
        time.sleep(0.01)


@contextlib.contextmanager
def _process(name: str, command: Sequence[str], log: Path, env: dict[str, str] | None = None):
    with open(log, "wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(peers.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class FuseBench:
    """The contenders over one chain: each yields the path of a file to measure."""

    def __init__(self, cfg: Config, qcow: QcowChain, cow: CowChain, workdir: Path) -> None:
        self.cfg = cfg
        self.qcow = qcow
        self.cow = cow
        self.workdir = workdir
        self.fresh = itertools.count(1)
        workdir.mkdir(parents=True, exist_ok=True)
        self.top = qcow.overlay(workdir / "top.qcow2", cfg.chain)
        self.view = "fuse-view"
        with cow.open() as store:
            store.view(self.view, cow.key(cfg.chain))

    def close(self) -> None:
        with self.cow.open() as store:
            store.remove(self.view)

    @contextlib.contextmanager
    def _snapshot(self, writes: bool, size: int | None = None) -> Iterator[str]:
        """The view of the top for reads; a fresh active snapshot (removed after) for writes."""
        if not writes:
            yield self.view
            return
        key = f"fuse-fresh-{next(self.fresh)}"
        with self.cow.open() as store:
            if size is None:
                store.prepare(key, self.cow.key(self.cfg.chain))
            else:
                store.prepare(key, size=size)
        try:
            yield key
        finally:
            with self.cow.open() as store:
                store.remove(key)

    def _mountpoint(self, name: str) -> Path:
        path = self.workdir / f"mnt-{name}"
        path.mkdir(exist_ok=True)
        kernel.clear_stale(str(path))
        return path

    @contextlib.contextmanager
    def cowstore(self, writes: bool, size: int | None = None) -> Iterator[Path]:
        with self._snapshot(writes, size) as key:
            mnt = self._mountpoint("cowstore")
            command = [*peers.cowstore_command(), "--store", str(self.cow.path), "mount", str(mnt)]
            log = self.workdir / "cowstore-mount.log"
            with _process("cowstore mount", command, log, peers.cowstore_env(self.cfg.engine)) as p:
                path = mnt / file_name(key)
                _wait_for(lambda: kernel.is_mounted(str(mnt)) and path.exists(), p, log, "cowstore mount")
                yield path

    @contextlib.contextmanager
    def nbdfuse(self, writes: bool, size: int | None = None) -> Iterator[Path]:
        with self._snapshot(writes, size) as key:
            sock = self.workdir / "nbd.sock"
            serve = peers.cowstore_serve_command(self.cow.path, sock, [key])
            env = peers.cowstore_env(self.cfg.engine)
            with peers.serving("cowstore", serve, sock, export=key, env=env) as s:
                mnt = self._mountpoint("nbdfuse")
                command = ["nbdfuse", *([] if writes else ["-r"]), str(mnt), s.uri]
                log = self.workdir / "nbdfuse.log"
                with _process("nbdfuse", command, log) as p:
                    _wait_for(lambda: kernel.is_mounted(str(mnt)), p, log, "nbdfuse")
                    try:
                        yield mnt / "nbd"
                    finally:
                        kernel.detach(str(mnt)) or kernel.detach(str(mnt), lazy=True)
                        p.wait(peers.STOP_TIMEOUT)

    @contextlib.contextmanager
    def qemu_storage_daemon(self, writes: bool) -> Iterator[Path]:
        image = self.top
        if writes:
            image = self.qcow.overlay(self.workdir / f"fresh-{next(self.fresh)}.qcow2", self.cfg.chain)
        target = self.workdir / "qsd-export"
        target.touch()
        kernel.clear_stale(str(target))
        command = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},aio=threads",
            "--blockdev",
            f"driver=qcow2,node-name=top,file=file0,read-only={'off' if writes else 'on'}",
            "--export",
            f"type=fuse,id=exp0,node-name=top,mountpoint={target},writable={'on' if writes else 'off'}",
        ]
        log = self.workdir / "qsd.log"
        try:
            with _process("qemu-storage-daemon", command, log) as p:
                _wait_for(lambda: kernel.is_mounted(str(target)), p, log, "qemu-storage-daemon")
                yield target
        finally:
            if writes:
                image.unlink(missing_ok=True)

    def contender(self, name: str) -> Callable[..., contextlib.AbstractContextManager[Path]]:
        chosen = {
            "cowstore": self.cowstore,
            "nbdfuse": self.nbdfuse,
            "qemu-storage-daemon": self.qemu_storage_daemon,
        }
        return chosen[name]

    def fio(self, job: peers.FioJob, log: Log) -> dict[str, Any]:
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
        direct: dict[str, bool] = {}
        for _ in range(self.cfg.pairs):
            for name in CONTENDERS:
                with self.contender(name)(job.writes) as path:
                    os.sync()
                    result, direct[name] = _fio(path, job, self.cfg, self.workdir)
                samples[name].append(result.as_dict())
        median = {name: {f: _median([s[f] for s in runs]) for f in runs[0]} for name, runs in samples.items()}
        ratios = {
            f"cowstore/{p}": _ratio(median["cowstore"]["iops"], median[p]["iops"]) for p in CONTENDERS[1:]
        }
        log(
            f"FUSE {job.name}: "
            + ", ".join(
                f"{n} {results.rate(m['iops'], 'IOPS')} {results.rate(m['bw_bytes'])}"
                for n, m in median.items()
            )
            + "; "
            + ", ".join(f"{k} {results.ratio(v)}" for k, v in ratios.items())
        )
        return {
            "job": job.name,
            "fio": asdict(job),
            "direct": direct,
            "samples": samples,
            "median": median,
            "ratios": ratios,
        }

    def ext4(self, log: Log) -> dict[str, Any]:
        """ext4 through a loop device over a fresh snapshot's file: write + fsync, then cold read."""
        size = max(2 * self.cfg.ext4_bytes, 256 * MiB)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in EXT4_CONTENDERS}
        for _ in range(self.cfg.ext4_pairs):
            for name in EXT4_CONTENDERS:
                with self.contender(name)(True, size) as path:
                    samples[name].append(_ext4_run(path, self.workdir / f"ext4-{name}", self.cfg.ext4_bytes))
        median = {name: {f: _median([s[f] for s in runs]) for f in runs[0]} for name, runs in samples.items()}
        ratios = {
            f"cowstore/nbdfuse {f}": _ratio(median["cowstore"][f], median["nbdfuse"][f])
            for f in ("write_bytes_per_s", "read_bytes_per_s")
        }
        log(
            "FUSE ext4: "
            + ", ".join(
                f"{n} write+fsync {results.rate(m['write_bytes_per_s'])}, "
                f"cold read {results.rate(m['read_bytes_per_s'])}"
                for n, m in median.items()
            )
            + "; "
            + ", ".join(f"{k} {results.ratio(v)}" for k, v in ratios.items())
        )
        return {"bytes": self.cfg.ext4_bytes, "samples": samples, "median": median, "ratios": ratios}


def _fio(path: Path, job: peers.FioJob, cfg: Config, workdir: Path) -> tuple[peers.FioResult, bool]:
    """fio with O_DIRECT, or without where the file refuses it; (result, direct)."""
    try:
        return peers.run_fio(path, job, runtime=cfg.runtime, ramp=cfg.ramp, workdir=workdir), True
    except RuntimeError as exc:
        if "Invalid argument" not in str(exc):
            raise
    return peers.run_fio(path, job, runtime=cfg.runtime, ramp=cfg.ramp, workdir=workdir, direct=False), False


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def _ext4_run(image: Path, where: Path, nbytes: int) -> dict[str, float]:
    """mkfs.ext4 on `image`, mount it through a loop device, time writing `nbytes` with a final
    fsync, drop caches, time reading them back."""
    run_tool(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)])
    where.mkdir(exist_ok=True)
    run_tool(["mount", "-o", "loop", str(image), str(where)])
    try:
        block = os.urandom(64 * MiB)
        view = memoryview(block)
        step = 1 * MiB
        t = time.perf_counter()
        fd = os.open(where / "big", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            for pos in range(0, nbytes, step):
                os.write(fd, view[pos % len(block) : pos % len(block) + step])
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - t
        _drop_caches()
        t = time.perf_counter()
        with open(where / "big", "rb", buffering=0) as f:
            buf = bytearray(step)
            while f.readinto(buf):
                pass
        read_s = time.perf_counter() - t
    finally:
        run_tool(["umount", str(where)])
    return {"write_bytes_per_s": nbytes / write_s, "read_bytes_per_s": nbytes / read_s}


def run(cfg: Config, workdir: Path, log: Log = print) -> dict[str, Any]:
    """Build the chain under `workdir`, then measure; returns the `vs_fuse` section."""
    start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    build_before = peers.build_identity()
    layout = Layout(cfg.size, cfg.chunk)
    qcow = QcowChain(workdir / "qcow2", layout)
    cow = CowChain(workdir / "store", layout, cfg.engine)
    t = time.perf_counter()
    qcow.extend(cfg.chain)
    cow.extend(cfg.chain)
    build_s = time.perf_counter() - t
    log(f"FUSE chain of {cfg.chain} built in {build_s:.1f} s")
    selected = jobs(cfg.numjobs)
    if cfg.jobs is not None:
        selected = [j for j in selected if j.name in cfg.jobs]
    bench = FuseBench(cfg, qcow, cow, workdir / "fuse")
    try:
        cases = [bench.fio(job, log) for job in selected]
        ext4 = bench.ext4(log) if cfg.ext4_pairs else None
    finally:
        bench.close()
    build_after = peers.build_identity()
    return {
        "fio": cases,
        "ext4": ext4,
        "meta": {
            "build": build_before,
            "build_changed": not peers.same_build(build_before, build_after),
            "config": asdict(cfg),
            "depth": cfg.chain + 1,
            "build_s": build_s,
            "seconds": time.perf_counter() - start,
            "started": started,
            "versions": peers.tool_versions(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="256 MiB volume, a chain of 8, shorter runs")
    p.add_argument("--size", type=parse_size, help="volume size (e.g. 1G, 256M)")
    p.add_argument("--chain", type=int, help="layers under the fresh top (default 32)")
    p.add_argument("--pairs", type=int, help="alternating rounds per fio case (median reported)")
    p.add_argument("--runtime", type=float, help="seconds per fio run (after the ramp)")
    p.add_argument("--ramp", type=float, help="fio ramp time in seconds (not measured)")
    p.add_argument("--numjobs", type=int, help="fio jobs (threads doing psync I/O)")
    p.add_argument("--jobs", type=lambda s: tuple(s.split(",")), help="only these fio jobs, comma separated")
    p.add_argument("--ext4-bytes", type=parse_size, help="bytes written to and read from ext4 (default 1G)")
    p.add_argument("--ext4-pairs", type=int, help="alternating rounds of the ext4 case (0: skip it)")
    p.add_argument("--engine", choices=["cython", "python"], help="cowstore engine (default: the default)")
    p.add_argument("--workdir", type=Path, help="where to make the build directory (default /var/tmp)")
    p.add_argument("--results", type=Path, default=results.RESULTS_DIR, help="results directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = QUICK if args.quick else FULL
    names = ("size", "chain", "pairs", "runtime", "ramp", "numjobs", "jobs", "ext4_bytes", "ext4_pairs")
    names += ("engine",)
    cfg = replace(cfg, **{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    missing = missing_tools()
    if missing or os.geteuid() != 0:
        why = f"missing tools: {', '.join(missing)}" if missing else "loop devices and drop_caches need root"
        print(f"vs_fuse: {why}", file=sys.stderr)
        return 2
    print(f"vs_fuse: {cfg}", flush=True)
    return results.measure(
        "vs_fuse",
        lambda base: run(cfg, base, log=lambda line: print(line, flush=True)),
        results.fuse_lines,
        workdir=args.workdir,
        directory=args.results,
    )


if __name__ == "__main__":
    sys.exit(main())
