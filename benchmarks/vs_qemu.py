"""Side by side with qemu: one chain built as qcow2 backing files and as cowstore snapshots, then read.

For every depth (default 1, 8, 32, 128 layers over a 1 GiB volume, 64 KiB chunks and
clusters; see `benchmarks.workload` for the layout) the script extends both chains,
checks that both read the same bytes, then runs, alternating the contenders (A B C A B C
…, `--pairs` rounds, medians reported):

- in process: cowstore's Python API reading a view of the top sequentially in 64 KiB and
  in 4 KiB at pseudo-random offsets, against `qemu-img bench` doing the same requests on the
  qcow2 top (one and 16 in flight), all from the page cache (every contender reads its
  data once first), and the memcpy bandwidth of this machine in the same run;
- over NBD: fio jobs (`--ioengine=nbd`) against `cowstore serve` on the cowstore top,
  `qemu-nbd` on the qcow2 top and `nbdkit file` on the top flattened to raw. The served top
  is a fresh, empty layer on the chain (so "depth" is the chain plus one); write jobs get
  a new fresh layer every run. Every run starts its own server, and starts after `sync`,
  so no run pays for the writeback of what the runs or the setup before it dirtied.

Results go to benchmarks/results/ (latest.json, latest.md, depth.png). Usage:
`python benchmarks/vs_qemu.py [--quick]`; `--help` for the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cowstore
from benchmarks import peers, results
from benchmarks.workload import CowChain, Layout, QcowChain, stride_offsets, verify
from cowstore.units import GiB, KiB, MiB, parse_size

SEQ_BLOCK = 64 * KiB
RAND_BLOCK = 4 * KiB
MEMCPY_BYTES = 64 * MiB
SERVERS = ("cowstore", "qemu-nbd", "nbdkit")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    """What to build and how long to measure."""

    size: int = 1 * GiB
    chunk: int = 64 * KiB
    depths: tuple[int, ...] = (1, 8, 32, 128)
    nbd_depths: tuple[int, ...] | None = None
    pairs: int = 3
    inprocess_pairs: int = 5
    runtime: float = 3.0
    ramp: float = 1.0
    numjobs: int = 4
    jobs: tuple[str, ...] | None = None
    rand_ops: int = 65536
    seq_bytes: int = 1 * GiB
    engine: str | None = None
    inprocess: bool = True
    nbd: bool = True


FULL = Config()
QUICK = Config(
    size=256 * MiB, depths=(1, 8, 32), pairs=3, runtime=2.0, ramp=0.5, rand_ops=16384, seq_bytes=256 * MiB
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def memcpy_bandwidth(nbytes: int = MEMCPY_BYTES, block: int = SEQ_BLOCK, repeat: int = 5) -> dict[str, Any]:
    """This machine's copy bandwidth (bytes/s, best of `repeat`), measured two ways.

    `whole`: one copy of an `nbytes` array into another (numpy, else a memoryview copy), the
    figure the issue asks for. `blocks`: the same source copied `block` bytes at a time into
    one reused `block`-byte buffer, which is what a sequential read into one buffer does (its
    destination stays in cache), so it is the ceiling of a read loop in Python.
    """
    try:
        import numpy as np
    except ImportError:
        src, dst = bytearray(b"\x01") * nbytes, bytearray(nbytes)
        view, small = memoryview(dst), memoryview(bytearray(block))
        pieces = [memoryview(src)[i : i + block] for i in range(0, nbytes, block)]

        def whole() -> None:
            view[:] = src

        def blocks() -> None:
            for piece in pieces:
                small[:] = piece

        method = "memoryview"
    else:
        src_a = np.ones(nbytes, dtype=np.uint8)
        dst_a = np.empty_like(src_a)
        small_a = np.empty(block, dtype=np.uint8)
        rows = list(src_a.reshape(-1, block))

        def whole() -> None:
            np.copyto(dst_a, src_a)

        def blocks() -> None:
            for row in rows:
                np.copyto(small_a, row)

        method = "numpy"
    out: dict[str, Any] = {"method": method}
    for name, copy in (("whole", whole), ("blocks", blocks)):
        copy()
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            copy()
            best = min(best, time.perf_counter() - start)
        out[name] = nbytes / best
    return out


def _cow_read(volume: cowstore.Volume, block: int, offsets: Sequence[int]) -> float:
    """Seconds to `preadinto` one reused buffer at every offset."""
    buf = bytearray(block)
    read = volume.preadinto
    start = time.perf_counter()
    for offset in offsets:
        read(buf, offset)
    return time.perf_counter() - start


def _raw_reader(path: Path) -> Callable[[int, int], bytes]:
    def read(length: int, offset: int) -> bytes:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    return read


def measure_inprocess(
    cfg: Config, layout: Layout, depth: int, volume: cowstore.Volume, qcow_top: Path, log: Log
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Alternating runs of cowstore's API, qemu-img bench (-d 1, -d 16) and memcpy on one depth."""
    passes = max(1, -(-cfg.seq_bytes // layout.size))
    seq = stride_offsets(layout.size, SEQ_BLOCK, passes * layout.size // SEQ_BLOCK, step=SEQ_BLOCK)
    rand = stride_offsets(layout.size, RAND_BLOCK, cfg.rand_ops)
    cases = {"seq-64k": (SEQ_BLOCK, seq, SEQ_BLOCK), "rand-4k": (RAND_BLOCK, rand, None)}

    def qemu(block: int, offsets: list[int], step: int | None, qd: int) -> float:
        return peers.qemu_img_bench(qcow_top, count=len(offsets), size=block, step=step, depth=qd)

    os.sync()
    _cow_read(volume, SEQ_BLOCK, seq[: layout.size // SEQ_BLOCK])
    peers.qemu_img_bench(qcow_top, count=layout.size // SEQ_BLOCK, size=SEQ_BLOCK, depth=16)
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in cases}
    memcpy: dict[str, list[float]] = {"whole": [], "blocks": []}
    method = "?"
    for _ in range(cfg.inprocess_pairs):
        for case, (block, offsets, step) in cases.items():
            nbytes = block * len(offsets)
            runners = {
                "cowstore": lambda b=block, o=offsets: _cow_read(volume, b, o),
                "qemu-img-qd1": lambda b=block, o=offsets, s=step: qemu(b, o, s, 1),
                "qemu-img-qd16": lambda b=block, o=offsets, s=step: qemu(b, o, s, 16),
            }
            for name, runner in runners.items():
                samples[case].setdefault(name, []).append(nbytes / runner())
        bw = memcpy_bandwidth()
        method = bw["method"]
        for kind, values in memcpy.items():
            values.append(bw[kind])
    whole, blocks = _median(memcpy["whole"]), _median(memcpy["blocks"])
    out = []
    for case, (block, offsets, _) in cases.items():
        med = {name: _median(values) for name, values in samples[case].items()}
        seq_case = case.startswith("seq")
        entry: dict[str, Any] = {
            "depth": depth,
            "case": case,
            "block": block,
            "requests": len(offsets),
            "unit": "bytes/s",
            "samples": samples[case],
            "median": med,
            "ratios": {f"cowstore/{p}": _ratio(med["cowstore"], med[p]) for p in med if p != "cowstore"},
            "memcpy_fraction": _ratio(med["cowstore"], whole) if seq_case else None,
            "memcpy_blocks_fraction": _ratio(med["cowstore"], blocks) if seq_case else None,
        }
        out.append(entry)
        figures = ", ".join(f"{n} {results.rate(v)}" for n, v in med.items())
        ratios = ", ".join(f"{k} {results.ratio(v)}" for k, v in entry["ratios"].items())
        extra = ""
        if seq_case and entry["memcpy_fraction"] and entry["memcpy_blocks_fraction"]:
            extra = (
                f", cowstore/memcpy {entry['memcpy_fraction']:.0%}"
                f" (of 64K-block memcpy {entry['memcpy_blocks_fraction']:.0%})"
            )
        log(f"depth {depth:>4} in process {case}: {figures}; {ratios}{extra}")
    log(f"depth {depth:>4} memcpy ({method}): {results.rate(whole)}, in 64K blocks {results.rate(blocks)}")
    return out, {
        "depth": depth,
        "method": method,
        "samples": memcpy["whole"],
        "median": whole,
        "samples_blocks": memcpy["blocks"],
        "median_blocks": blocks,
    }


class NbdBench:
    """The three servers over one depth of the chain, and the fio runs against them."""

    def __init__(
        self, cfg: Config, qcow: QcowChain, cow: CowChain, depth: int, workdir: Path, sockdir: Path
    ) -> None:
        self.cfg = cfg
        self.qcow = qcow
        self.cow = cow
        self.depth = depth
        self.workdir = workdir
        self.sockdir = sockdir
        self.fresh = itertools.count(1)
        workdir.mkdir(parents=True, exist_ok=True)
        self.top = qcow.overlay(workdir / "top.qcow2", depth)
        self.flat = qcow.flatten(depth, workdir / "flat.raw")
        self.flat_rw = workdir / "flat-rw.raw"
        shutil.copyfile(self.flat, self.flat_rw)
        self.view = f"nbd-view-{depth}"
        with cow.open() as store:
            store.view(self.view, cow.key(depth))

    def close(self) -> None:
        with self.cow.open() as store:
            store.remove(self.view)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def cowstore(self, writes: bool) -> Iterator[str]:
        key = f"nbd-fresh-{self.depth}-{next(self.fresh)}" if writes else self.view
        if writes:
            with self.cow.open() as store:
                store.prepare(key, self.cow.key(self.depth))
        try:
            sock = self.sockdir / "cowstore.sock"
            command = peers.cowstore_serve_command(self.cow.path, sock, [key])
            with peers.serving(
                "cowstore", command, sock, export=key, env=peers.cowstore_env(self.cfg.engine)
            ) as s:
                yield s.uri
        finally:
            if writes:
                with self.cow.open() as store:
                    store.remove(key)

    @contextlib.contextmanager
    def qemu_nbd(self, writes: bool) -> Iterator[str]:
        image = self.top
        if writes:
            image = self.qcow.overlay(self.workdir / f"fresh-{next(self.fresh)}.qcow2", self.depth)
        try:
            sock = self.sockdir / "qemu-nbd.sock"
            with peers.serving(
                "qemu-nbd", peers.qemu_nbd_command(image, sock, readonly=not writes), sock
            ) as s:
                yield s.uri
        finally:
            if writes:
                image.unlink(missing_ok=True)

    @contextlib.contextmanager
    def nbdkit(self, writes: bool) -> Iterator[str]:
        sock = self.sockdir / "nbdkit.sock"
        image = self.flat_rw if writes else self.flat
        with peers.serving("nbdkit", peers.nbdkit_command(image, sock, readonly=not writes), sock) as s:
            yield s.uri

    def run(self, jobs: Sequence[peers.FioJob], log: Log) -> list[dict[str, Any]]:
        servers = {"cowstore": self.cowstore, "qemu-nbd": self.qemu_nbd, "nbdkit": self.nbdkit}
        out = []
        for job in jobs:
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for _ in range(self.cfg.pairs):
                for name, server in servers.items():
                    with server(job.writes) as uri:
                        os.sync()
                        result = peers.run_fio(
                            uri, job, runtime=self.cfg.runtime, ramp=self.cfg.ramp, workdir=self.workdir
                        )
                    samples[name].append(result.as_dict())
            median = {
                name: {field: _median([s[field] for s in runs]) for field in runs[0]}
                for name, runs in samples.items()
            }
            ratios = {
                f"cowstore/{p}": _ratio(median["cowstore"]["iops"], median[p]["iops"])
                for p in servers
                if p != "cowstore"
            }
            out.append(
                {
                    "depth": self.depth + 1,
                    "chain": self.depth,
                    "job": job.name,
                    "fio": asdict(job),
                    "samples": samples,
                    "median": median,
                    "ratios": ratios,
                }
            )
            figures = ", ".join(
                f"{n} {results.rate(m['iops'], 'IOPS')} {results.rate(m['bw_bytes'])}"
                for n, m in median.items()
            )
            rs = ", ".join(f"{k} {results.ratio(v)}" for k, v in ratios.items())
            log(f"depth {self.depth + 1:>4} NBD {job.name}: {figures}; {rs}")
        return out


def select_jobs(cfg: Config) -> list[peers.FioJob]:
    jobs = peers.standard_jobs(cfg.numjobs)
    if cfg.jobs is not None:
        unknown = set(cfg.jobs) - {j.name for j in jobs}
        if unknown:
            raise ValueError(f"unknown fio jobs {sorted(unknown)}; have {[j.name for j in jobs]}")
        jobs = [j for j in jobs if j.name in cfg.jobs]
    return jobs


def run(cfg: Config, workdir: Path, log: Log = print) -> dict[str, Any]:
    """Build, check and measure every depth of `cfg` under `workdir`; returns the `vs_qemu` section."""
    start = time.perf_counter()
    workdir = Path(workdir)
    layout = Layout(cfg.size, cfg.chunk)
    qcow = QcowChain(workdir / "qcow2", layout)
    cow = CowChain(workdir / "store", layout, cfg.engine)
    jobs = select_jobs(cfg)
    nbd_depths = set(cfg.depths if cfg.nbd_depths is None else cfg.nbd_depths) if cfg.nbd else set()
    section: dict[str, Any] = {"inprocess": [], "memcpy": [], "nbd": []}
    started = _now()
    build_before = peers.build_identity()
    build = 0.0
    engine = "?"
    with tempfile.TemporaryDirectory(prefix="cowbench-") as sockdir:
        for depth in sorted(set(cfg.depths)):
            t = time.perf_counter()
            qcow.extend(depth)
            cow.extend(depth)
            build += time.perf_counter() - t
            log(f"depth {depth:>4} built in {time.perf_counter() - t:.1f} s")
            flat = qcow.flatten(depth, workdir / "check.raw")
            with cow.open() as store:
                engine = store.engine
                view = store.view(f"view-{depth}", cow.key(depth))
                verify(layout, depth, {"cowstore": view.pread, "qcow2": _raw_reader(flat)})
                flat.unlink()
                if cfg.inprocess:
                    cases, memcpy = measure_inprocess(cfg, layout, depth, view, qcow.path(depth), log)
                    section["inprocess"] += cases
                    section["memcpy"].append(memcpy)
                store.remove(view.key)
            if depth in nbd_depths:
                bench = NbdBench(cfg, qcow, cow, depth, workdir / f"nbd-{depth}", Path(sockdir))
                try:
                    section["nbd"] += bench.run(jobs, log)
                finally:
                    bench.close()
    build_after = peers.build_identity()
    changed = not peers.same_build(build_before, build_after)
    if changed:
        log(f"WARNING: cowstore changed during the run ({build_before} -> {build_after}): measure again")
    section["meta"] = {
        "build": build_before,
        "build_changed": changed,
        "config": asdict(cfg),
        "engine": engine,
        "build_s": build,
        "seconds": time.perf_counter() - start,
        "started": started,
        "finished": _now(),
        "versions": peers.tool_versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    return section


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="256 MiB volume, depths 1,8,32, shorter runs")
    p.add_argument("--size", type=parse_size, help="volume size (e.g. 1G, 256M)")
    p.add_argument("--depths", type=_ints, help="chain depths, comma separated (default 1,8,32,128)")
    p.add_argument("--nbd-depths", type=_ints, help="depths that also run the NBD cases (default: all)")
    p.add_argument("--pairs", type=int, help="alternating rounds per NBD case (median reported; at least 3)")
    p.add_argument("--inprocess-pairs", type=int, help="alternating rounds per in-process case (default 5)")
    p.add_argument("--runtime", type=float, help="seconds per fio run (after the ramp)")
    p.add_argument("--ramp", type=float, help="fio ramp time in seconds (not measured)")
    p.add_argument("--numjobs", type=int, help="connections of the multi-connection fio jobs")
    p.add_argument("--jobs", type=lambda s: tuple(s.split(",")), help="only these fio jobs, comma separated")
    p.add_argument("--rand-ops", type=int, help="4 KiB requests per in-process random sample")
    p.add_argument(
        "--seq-bytes", type=parse_size, help="bytes per in-process sequential sample (whole passes)"
    )
    p.add_argument("--engine", choices=["cython", "python"], help="cowstore engine (default: the default)")
    p.add_argument("--no-nbd", action="store_true", help="skip the NBD cases")
    p.add_argument("--workdir", type=Path, help="where to make the build directory (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=results.RESULTS_DIR, help="results directory")
    return p


def config_from(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else FULL
    changes = {
        name: getattr(args, name)
        for name in (
            "size",
            "depths",
            "nbd_depths",
            "pairs",
            "inprocess_pairs",
            "runtime",
            "ramp",
            "numjobs",
            "jobs",
            "rand_ops",
            "seq_bytes",
            "engine",
        )
        if getattr(args, name) is not None
    }
    if args.no_nbd:
        changes["nbd"] = False
    return replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from(args)
    missing = peers.missing_tools()
    if missing:
        print(
            f"vs_qemu: missing tools: {', '.join(missing)} (Debian: qemu-utils, nbdkit, fio)", file=sys.stderr
        )
        return 2
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="cowstore-vs-qemu-", dir=parent))
    print(f"vs_qemu: {cfg}\nvs_qemu: working in {base}", flush=True)
    try:
        section = run(cfg, base, log=lambda line: print(line, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    doc = results.update("vs_qemu", section, args.results)
    print()
    print(results.markdown({k: v for k, v in doc.items() if k != "micro"}))
    print(f"vs_qemu: results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
