"""Snapshotters side by side under one private containerd: overlayfs, native and cowstore.

Per round, each contender in turn (the order rotates every round), from an empty content
store and no snapshots:

- `ctr images import --snapshotter S` of the benchmark image (~200 MiB in 5 layers of many
  small files and a few large ones) and of the 2 GiB variant (imported alone first; not
  with `--quick` or `--no-big`);
- `ctr run --rm IMAGE ID /bin/true`, start to exit, `--runs` times, for each image;
- a cold sequential read of the first large file of every layer, one after the other, in a
  running container once caches are dropped, timed inside it with /proc/uptime (10 ms);
- disk: the growth of the snapshotter's data directory (`du`; for cowstore its store) once
  `--containers` containers of the image have each written `--write-mib` MiB and exited.

Medians per contender and their ratios to overlayfs go to benchmarks/results (section
`vs_containerd` of latest.json, and latest.md). cowstore joins by serving containerd's
snapshots API (`cowstore serve --containerd SOCK --store DIR`, tests/containerd/plugin.py)
as a proxy plugin.
Usage: `python benchmarks/vs_containerd.py [--quick] [--no-big]`; `--help` for the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
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
from tests.containerd import daemon, images, plugin

CONTENDERS = ("overlayfs", "native", plugin.NAME)
BASELINE = "overlayfs"
SPECS = {s.name: s for s in (images.BENCH_QUICK, images.BENCH_200M, images.BENCH_2G)}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    """What to measure, and how often."""

    image: str = images.BENCH_200M.name
    big: str | None = None
    rounds: int = 3
    runs: int = 5
    containers: int = 10
    write_mib: int = 10
    contenders: tuple[str, ...] = CONTENDERS


FULL = Config(big=images.BENCH_2G.name)
QUICK = Config(image=images.BENCH_QUICK.name, rounds=1, runs=3, containers=3, write_mib=2)


@dataclass(frozen=True)
class Contender:
    """A snapshotter as ctr names it, and the directory whose growth is its disk use."""

    name: str
    data_dir: Path


def missing_tools() -> list[str]:
    return daemon.missing_tools() + images.missing_tools() + [t for t in ("du",) if shutil.which(t) is None]


@contextlib.contextmanager
def contenders(
    names: Sequence[str], workdir: Path, log: Log
) -> Iterator[tuple[daemon.Containerd, list[Contender]]]:
    """One containerd serving every contender: (daemon, contenders).

    The cowstore plugin starts first: containerd reaches a proxy plugin on the socket its
    config names.
    """
    with contextlib.ExitStack() as stack:
        proxies: dict[str, Path] = {}
        for name in names:
            if name in daemon.BUILTIN_SNAPSHOTTERS:
                continue
            if name != plugin.NAME:
                raise ValueError(f"unknown contender {name}")
            sock = workdir / "cowstore.sock"
            stack.enter_context(plugin.serving(workdir / "cowstore-store", sock, workdir / "cowstore.log"))
            proxies[name] = sock
        ctrd = stack.enter_context(daemon.Containerd(workdir / "containerd", proxies, namespace="bench"))
        lineup = [
            Contender(n, workdir / "cowstore-store" if n == plugin.NAME else ctrd.snapshotter_root(n))
            for n in names
        ]
        yield ctrd, lineup
    if ctrd.leftovers:
        log(f"containerd left behind (removed): {ctrd.leftovers}")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def disk_used(path: Path) -> int:
    """Bytes allocated under `path` (hard links once), as `du` counts them."""
    if not path.exists():
        return 0
    out = subprocess.run(
        ["du", "-sx", "--block-size=1", str(path)], capture_output=True, text=True, timeout=600
    )
    return int(out.stdout.split()[0])


def _empty(ctrd: daemon.Containerd, who: Contender) -> None:
    ctrd.clear()
    left = ctrd.snapshots(who.name)
    if left:
        raise RuntimeError(f"{who.name} still holds snapshots after GC: {left}")


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def import_seconds(ctrd: daemon.Containerd, who: Contender, image: images.Image) -> float:
    """`ctr images import` from an empty content store, so every contender ingests the blobs too."""
    _empty(ctrd, who)
    os.sync()
    return _timed(lambda: ctrd.ctr("images", "import", "--snapshotter", who.name, str(image.archive)))


def run_seconds(ctrd: daemon.Containerd, who: Contender, image: images.Image, runs: int) -> list[float]:
    return [
        _timed(
            lambda i=i: ctrd.run_container(
                image.ref, f"true-{i}", "/bin/true", snapshotter=who.name, capture=False
            )
        )
        for i in range(runs)
    ]


def cold_read(
    ctrd: daemon.Containerd, who: Contender, image: images.Image, paths: Sequence[str]
) -> dict[str, float]:
    """Read `paths` whole in a running container after dropping caches, timed inside it.

    The container (and its snapshot: native copies the image there) is made before the caches
    are dropped, so what is read is what the snapshotter has on disk.
    """
    files = " ".join(f"/{p}" for p in paths)
    script = f"read a b < /proc/uptime; cat {files} > /dev/null; read c d < /proc/uptime; echo $a $c"
    ctrd.start_detached(image.ref, "reader", "/bin/sleep", "3600", snapshotter=who.name)
    try:
        drop_caches()
        t = time.perf_counter()
        out = ctrd.exec("reader", "read", "/bin/sh", "-c", script).stdout
        wall = time.perf_counter() - t
    finally:
        ctrd.remove("reader")
    start, end = map(float, out.split())
    seconds = max(end - start, 0.01)
    size = sum(image.tree[p].size for p in paths)
    return {"bytes": size, "seconds": seconds, "bytes_per_s": size / seconds, "wall_s": wall}


def disk_growth(ctrd: daemon.Containerd, who: Contender, image: images.Image, cfg: Config) -> dict[str, int]:
    """Data directory growth once `cfg.containers` containers each wrote `cfg.write_mib` MiB.

    cowstore's store is compacted first: Cleanup leaves free chunks on disk for containers
    to reuse (`CLEANUP_SLACK`), which would hide part of the growth."""
    ctrd.collect()
    if who.name == plugin.NAME:
        plugin.cli(who.data_dir, "compact")
    os.sync()
    before = disk_used(who.data_dir)
    write = f"dd if=/dev/urandom of=/written bs=1M count={cfg.write_mib} 2>/dev/null && sync"
    names = [f"writer-{i}" for i in range(cfg.containers)]
    try:
        for name in names:
            ctrd.run_container(image.ref, name, "/bin/sh", "-c", write, snapshotter=who.name, rm=False)
        ctrd.collect()
        os.sync()
        after = disk_used(who.data_dir)
    finally:
        ctrd.remove(*names)
    return {
        "image_bytes": before,
        "growth_bytes": after - before,
        "written_bytes": cfg.containers * cfg.write_mib << 20,
    }


def _version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return out.splitlines()[0] if out else "?"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _case(name: str, unit: str, better: str, samples: dict[str, list[float]]) -> dict[str, Any]:
    median = {c: _median(v) for c, v in samples.items()}
    base = median.get(BASELINE)
    ratios = {f"{c}/{BASELINE}": (m / base if m is not None and base else None) for c, m in median.items()}
    return {
        "case": name,
        "unit": unit,
        "better": better,
        "samples": samples,
        "median": median,
        "ratios": ratios,
    }


def run(cfg: Config, workdir: Path, log: Log = print) -> dict[str, Any]:
    """Measure every contender under one containerd in `workdir`; returns the `vs_containerd` section."""
    start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    build_before = peers.build_identity()
    t = time.perf_counter()
    image = images.bench_image(SPECS[cfg.image])
    big = images.bench_image(SPECS[cfg.big]) if cfg.big else None
    log(
        f"images ready in {time.perf_counter() - t:.1f} s: {image.archive}"
        + (f", {big.archive}" if big else "")
    )
    spec = SPECS[cfg.image]
    large = [images.bench_large_file(spec, n, 0) for n in range(spec.layers)]
    samples: dict[str, dict[str, list[float]]] = {}

    def add(case: str, who: str, *values: float) -> None:
        samples.setdefault(case, {}).setdefault(who, []).extend(values)

    with contenders(cfg.contenders, workdir, log) as (ctrd, lineup):
        for r in range(cfg.rounds):
            order = lineup[r % len(lineup) :] + lineup[: r % len(lineup)] if lineup else []
            for who in order:
                if big is not None:
                    s = import_seconds(ctrd, who, big)
                    add(f"import {big.ref}", who.name, s)
                    runs = run_seconds(ctrd, who, big, cfg.runs)
                    add(f"run /bin/true {big.ref}", who.name, *runs)
                    log(f"round {r + 1} {who.name}: import {big.ref} {s:.2f} s, run {_median(runs):.3f} s")
                s = import_seconds(ctrd, who, image)
                add(f"import {image.ref}", who.name, s)
                runs = run_seconds(ctrd, who, image, cfg.runs)
                add(f"run /bin/true {image.ref}", who.name, *runs)
                read = cold_read(ctrd, who, image, large)
                add("cold read", who.name, read["bytes_per_s"])
                disk = disk_growth(ctrd, who, image, cfg)
                add("disk growth", who.name, disk["growth_bytes"])
                add("disk image", who.name, disk["image_bytes"])
                log(
                    f"round {r + 1} {who.name}: import {s:.2f} s, run {_median(runs):.3f} s, "
                    f"cold read {read['bytes_per_s'] / 1e6:.0f} MB/s ({read['seconds']:.2f} s), "
                    f"disk +{disk['growth_bytes'] / 2**20:.1f} MiB for {cfg.containers} x {cfg.write_mib} MiB"
                )
                _empty(ctrd, who)
    units = {
        "import": ("s", "lower"),
        "run /bin/true": ("s", "lower"),
        "cold read": ("B/s", "higher"),
        "disk growth": ("B", "lower"),
        "disk image": ("B", "lower"),
    }
    cases = []
    for case, by_who in samples.items():
        unit, better = next(v for k, v in units.items() if case.startswith(k))
        cases.append(_case(case, unit, better, by_who))
    build_after = peers.build_identity()
    described = [image, *([big] if big else [])]
    return {
        "cases": cases,
        "contenders": [c.name for c in lineup],
        "images": {
            i.ref: {
                "layers": len(i.layers),
                "files": sum(e.kind == "file" for e in i.tree.values()),
                "bytes": i.size,
                "archive_bytes": i.archive.stat().st_size,
            }
            for i in described
        },
        "meta": {
            "build": build_before,
            "build_changed": not peers.same_build(build_before, build_after),
            "config": asdict(cfg),
            "cold_read": {"paths": large, "bytes": sum(image.tree[p].size for p in large)},
            "seconds": time.perf_counter() - start,
            "started": started,
            "versions": {t: _version(t) for t in ("containerd", "runc", "umoci")},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a 40 MiB image, one round, 3 containers of 2 MiB")
    p.add_argument("--no-big", action="store_true", help=f"leave out the {images.BENCH_2G.name} image")
    p.add_argument("--image", choices=sorted(SPECS), help=f"the image measured (default {FULL.image})")
    p.add_argument("--rounds", type=int, help="rounds, every contender once a round (median reported)")
    p.add_argument("--runs", type=int, help="ctr run /bin/true per contender a round")
    p.add_argument("--containers", type=int, help="containers writing for the disk case")
    p.add_argument("--write-mib", type=int, help="MiB each of them writes")
    p.add_argument("--contenders", type=lambda s: tuple(s.split(",")), help=f"default {','.join(CONTENDERS)}")
    p.add_argument("--workdir", type=Path, help="where to make the working directory (default /var/tmp)")
    p.add_argument("--results", type=Path, default=results.RESULTS_DIR, help="results directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = QUICK if args.quick else FULL
    names = ("image", "rounds", "runs", "containers", "write_mib", "contenders")
    cfg = replace(cfg, **{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    if args.no_big:
        cfg = replace(cfg, big=None)
    missing = missing_tools()
    if missing or os.geteuid() != 0:
        why = f"missing tools: {', '.join(missing)}" if missing else "containerd and drop_caches need root"
        print(f"vs_containerd: {why}", file=sys.stderr)
        return 2
    print(f"vs_containerd: {cfg}", flush=True)
    return results.measure(
        "vs_containerd",
        lambda base: run(cfg, base, log=lambda line: print(line, flush=True)),
        results.containerd_lines,
        workdir=args.workdir,
        directory=args.results,
    )


if __name__ == "__main__":
    sys.exit(main())
