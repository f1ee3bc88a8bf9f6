"""A focused probe of NBD random writes: `cowstore serve` against `nbdkit file`, nothing else.

The same workload as `vs_qemu.py`'s NBD write jobs (a chain of `--chain` layers over a
1 GiB volume, 64 KiB chunks, a fresh empty top per cowstore run, so the served depth is
the chain plus one; nbdkit overwrites the chain flattened to raw), but only the fio jobs
asked for (default randwrite-4k-qd16 and its 4-connection twin), with the contenders
alternating A B A B … `--pairs` rounds, medians and ratios printed. No qcow2 chain is
built: the flat raw image comes from reading the cowstore top.

`--also NAME=DIR` adds a contender: `cowstore serve` with the package found in DIR (a
copy of another build of `cowstore/`, e.g. the one before a change), so a change can be
measured against its base in the same alternation. `--workdir DIR` keeps the built chain
there and reuses it on the next run.

Usage: `python benchmarks/nbdwrite_probe.py [--pairs 5] [--also base=/tmp/cowstore-base]`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cowstore
from benchmarks import peers
from benchmarks.workload import CowChain, Layout, verify
from cowstore.units import GiB, KiB, MiB, parse_size

STEP = 4 * MiB


def _flatten(chain: CowChain, depth: int, out: Path) -> None:
    """The top of the chain as one raw image (what `nbdkit file` serves)."""
    with chain.open() as store:
        view = store.view("probe-flatten", chain.key(depth))
        try:
            with open(out, "wb") as f:
                for pos in range(0, chain.layout.size, STEP):
                    f.write(view.pread(min(STEP, chain.layout.size - pos), pos))
        finally:
            store.remove(view.key)


def _prepare(workdir: Path, size: int, depth: int) -> tuple[CowChain, Path]:
    layout = Layout(size, 64 * KiB)
    chain = CowChain(workdir / "store", layout)
    marker = workdir / f"built-{size}-{depth}"
    flat = workdir / "flat-rw.raw"
    if marker.exists() and flat.exists():
        chain.depth = depth
        return chain, flat
    shutil.rmtree(workdir / "store", ignore_errors=True)
    print(f"probe: building a {depth}-layer chain of {size} bytes in {workdir}", flush=True)
    chain.extend(depth)
    staging = workdir / "flat.raw"
    _flatten(chain, depth, staging)
    # As vs_qemu does (shutil.copyfile, which is sendfile here): how the raw file's pages
    # entered the cache matters to nbdkit 4x on this kernel. Written in large sequential
    # writes they sit in large folios, and each 4 KiB write into one costs ext4 a walk of
    # the folio's buffer heads (22k against 97k IOPS measured).
    shutil.copyfile(staging, flat)
    staging.unlink()
    with chain.open() as store:
        view = store.view("probe-verify", chain.key(depth))
        try:
            verify(layout, depth, {"cowstore": view.pread, "flat": _raw_reader(flat)})
        finally:
            store.remove(view.key)
    marker.touch()
    return chain, flat


def _raw_reader(path: Path):
    def read(length: int, offset: int) -> bytes:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    return read


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(root: Path | None) -> dict[str, str]:
    env = peers.cowstore_env("cython")
    if root is not None:
        env["PYTHONPATH"] = str(root)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chain", type=int, default=32, help="layers under the fresh top (default 32: depth 33)")
    p.add_argument("--size", type=parse_size, default=1 * GiB, help="volume size (default 1G)")
    p.add_argument("--pairs", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run after the ramp")
    p.add_argument("--ramp", type=float, default=1.0, help="fio ramp seconds")
    p.add_argument("--numjobs", type=int, default=4, help="connections of the -xN job")
    p.add_argument(
        "--jobs",
        default="randwrite-4k-qd16,randwrite-4k-qd16-x4",
        help="fio jobs of vs_qemu's standard set, comma separated",
    )
    p.add_argument("--no-nbdkit", action="store_true", help="only cowstore contenders")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another cowstore contender: the package under DIR (repeatable)",
    )
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the built chain here")
    args = p.parse_args(argv)

    missing = peers.missing_tools(("nbdkit", "fio"))
    if missing:
        print(f"probe: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    wanted = args.jobs.split(",")
    jobs = [j for j in peers.standard_jobs(args.numjobs) if j.name in wanted]
    if len(jobs) != len(wanted):
        print(f"probe: unknown jobs in {wanted}", file=sys.stderr)
        return 2

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cowstore-probe-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    chain, flat = _prepare(workdir, args.size, args.chain)
    fresh = itertools.count(1)

    @contextlib.contextmanager
    def cow(root: Path | None, sockdir: Path) -> Iterator[peers.Server]:
        key = f"probe-fresh-{os.getpid()}-{next(fresh)}"
        with chain.open() as store:
            store.prepare(key, chain.key(args.chain))
        try:
            sock = sockdir / "cowstore.sock"
            command = peers.cowstore_serve_command(chain.path, sock, [key])
            with peers.serving("cowstore", command, sock, export=key, env=_env(root)) as s:
                yield s
        finally:
            with chain.open() as store:
                store.remove(key)

    @contextlib.contextmanager
    def nbdkit(sockdir: Path) -> Iterator[peers.Server]:
        sock = sockdir / "nbdkit.sock"
        with peers.serving("nbdkit", peers.nbdkit_command(flat, sock, readonly=False), sock) as s:
            yield s

    contenders = {"cowstore": lambda d: cow(None, d)}
    for spec in args.also:
        name, _, root = spec.partition("=")
        contenders[name] = lambda d, r=Path(root): cow(r, d)
    if not args.no_nbdkit:
        contenders["nbdkit"] = nbdkit
    print(f"probe: cowstore {cowstore.__file__}, depth {args.chain + 1}, {args.pairs} pairs", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="cowprobe-") as sockdir:
            for job in jobs:
                samples: dict[str, list[float]] = {n: [] for n in contenders}
                cpu: dict[str, list[float]] = {n: [] for n in contenders}
                for round_ in range(args.pairs):
                    for name, server in contenders.items():
                        with server(Path(sockdir)) as s:
                            os.sync()
                            before = _cpu_seconds(s.process.pid)
                            r = peers.run_fio(
                                s.uri, job, runtime=args.runtime, ramp=args.ramp, workdir=workdir / "fio"
                            )
                            used = _cpu_seconds(s.process.pid) - before
                        # CPU per request, the ramp's requests counted at the measured rate
                        per = used / (r.iops * (args.runtime + args.ramp)) * 1e6
                        samples[name].append(r.iops)
                        cpu[name].append(per)
                        print(
                            f"  {job.name} round {round_ + 1} {name}: {r.iops / 1000:.1f} kIOPS,"
                            f" server CPU {per:.1f} us/request",
                            flush=True,
                        )
                med = {n: statistics.median(v) for n, v in samples.items()}
                line = ", ".join(
                    f"{n} {m / 1000:.1f}k ({statistics.median(cpu[n]):.1f} us CPU/request)"
                    for n, m in med.items()
                )
                ratios = ""
                if "nbdkit" in med:
                    ratios = "; " + ", ".join(
                        f"{n}/nbdkit {m / med['nbdkit']:.0%}" for n, m in med.items() if n != "nbdkit"
                    )
                print(f"{job.name} depth {args.chain + 1} medians: {line}{ratios}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
