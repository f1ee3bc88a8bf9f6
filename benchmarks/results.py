"""The results files: `latest.json` (all figures), `latest.md` (tables and targets), `depth.png` (the plot).

The JSON has one section per producer: `micro` (benchmarks/test_micro.py, merged entry by
entry, so a partial run updates only what it measured), `vs_qemu` (benchmarks/vs_qemu.py),
`vs_fuse` and `vs_containerd` (benchmarks/vs_fuse.py, vs_containerd.py), each replaced whole.
Every update rewrites the markdown and the plot from the whole JSON, and checks the targets
of the issue against whatever has been measured.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JSON_NAME, MD_NAME, PNG_NAME = "latest.json", "latest.md", "depth.png"
TARGET_CHAIN = 32
INPROCESS_PEER = "qemu-img-qd1"


def load(directory: Path = RESULTS_DIR) -> dict[str, Any]:
    path = Path(directory) / JSON_NAME
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def update(
    section: str,
    data: dict[str, Any],
    directory: Path = RESULTS_DIR,
    *,
    merge: bool = False,
    plot: bool = True,
) -> dict[str, Any]:
    """Store `data` as `section` (merged key by key into its dicts with `merge`), then re-render.

    Returns the whole document.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = load(directory)
    if merge and isinstance(doc.get(section), dict):
        old = doc[section]
        for key, value in data.items():
            if isinstance(value, dict) and isinstance(old.get(key), dict):
                old[key] = {**old[key], **value}
            else:
                old[key] = value
    else:
        doc[section] = data
    doc = _clean(doc)
    doc["targets"] = [t.as_dict() for t in targets(doc)]
    _write(directory / JSON_NAME, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    _write(directory / MD_NAME, markdown(doc).encode())
    if plot:
        draw(doc, directory / PNG_NAME)
    return doc


def measure(
    section: str,
    run: Callable[[Path], dict[str, Any]],
    lines: Callable[[dict[str, Any]], list[str]],
    *,
    workdir: Path | None,
    directory: Path = RESULTS_DIR,
) -> int:
    """Run a side-by-side in a fresh directory under `workdir` (default /var/tmp), removed
    after; store what it returns as `section` and print its table (`lines`)."""
    parent = workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"cowstore-{section.replace('_', '-')}-", dir=parent))
    print(f"{section}: working in {base}", flush=True)
    try:
        data = run(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    doc = update(section, data, directory)
    print()
    print("\n".join(lines(doc[section])))
    print(f"{section}: results in {directory}")
    return 0


# -- formatting ---------------------------------------------------------------


def rate(value: float | None, unit: str = "B/s") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


# -- targets ------------------------------------------------------------------


@dataclass
class Target:
    """One target of the issue: what it asks, what was measured, whether it is met (None: not measured)."""

    goal: str
    measured: str
    met: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {"goal": self.goal, "measured": self.measured, "met": self.met}

    @property
    def status(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]


def _micro(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    return ((doc.get("micro") or {}).get("benchmarks") or {}).get(key)


def _micro_figure(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    return ((doc.get("micro") or {}).get("figures") or {}).get(key)


def _nbd_target(doc: dict[str, Any]) -> Target:
    goal = f"every NBD case at depth {TARGET_CHAIN + 1}: ≥ 90 % of nbdkit (flattened raw)"
    cases = [c for c in (doc.get("vs_qemu") or {}).get("nbd", []) if c.get("chain") == TARGET_CHAIN]
    found = [(c["job"], (c.get("ratios") or {}).get("cowstore/nbdkit")) for c in cases]
    found = [(job, r) for job, r in found if r is not None]
    if not found:
        return Target(goal, "not run at this depth", None)
    text = ", ".join(f"{job} {r:.0%}" for job, r in found)
    return Target(goal, text, all(r >= 0.9 for _, r in found))


def _inprocess_target(doc: dict[str, Any]) -> Target:
    goal = (
        f"in process 64 KiB sequential reads at depth {TARGET_CHAIN}: ≥ 2x qemu-img bench, ≥ 50 % of memcpy"
    )
    vs = doc.get("vs_qemu") or {}
    case = next(
        (c for c in vs.get("inprocess", []) if c["depth"] == TARGET_CHAIN and c["case"] == "seq-64k"), None
    )
    if case is None:
        return Target(goal, "not run at this depth", None)
    med = case.get("median") or {}
    vs_qd1 = _div(med.get("cowstore"), med.get("qemu-img-qd1"))
    vs_qd16 = _div(med.get("cowstore"), med.get("qemu-img-qd16"))
    memcpy, blocks = case.get("memcpy_fraction"), case.get("memcpy_blocks_fraction")
    parts = [
        f"{rate(med.get('cowstore'))}: {ratio(vs_qd1)} qemu-img bench -d 1, {ratio(vs_qd16)} -d 16",
        f"{memcpy:.0%} of memcpy" if memcpy is not None else "memcpy -",
    ]
    if blocks is not None:
        parts[-1] += f" ({blocks:.0%} of memcpy in 64K blocks)"
    known = [r for r in (vs_qd1, vs_qd16) if r is not None]
    met = None if not known or memcpy is None else (min(known) >= 2 and memcpy >= 0.5)
    return Target(goal, ", ".join(parts), met)


def _depth_target(doc: dict[str, Any]) -> Target:
    goal = "read throughput at depth 1024 ≥ 90 % of depth 1 (Cython engine)"
    alt = (_micro_figure(doc, "read_depth_alternating[cython]") or {}).get("depths") or {}
    one, deep = _micro(doc, "read_depth[cython-1]"), _micro(doc, "read_depth[cython-1024]")
    parts, r = [], None
    if "1" in alt and "1024" in alt:
        a, b = alt["1"]["bytes_per_s"], alt["1024"]["bytes_per_s"]
        r = _div(b, a)
        parts.append(f"{rate(b)} vs {rate(a)}: {r:.0%} (depths read in turn, median)")
    if one and deep:
        seq = _div(deep.get("bytes_per_s"), one.get("bytes_per_s"))
        if r is None:
            r = seq
        if seq is not None:
            parts.append(f"one depth after another {seq:.0%}")
    if r is None:
        return Target(goal, "not measured", None)
    return Target(goal, "; ".join(parts), r >= 0.9)


def _prepare_target(doc: dict[str, Any]) -> Target:
    goal = "prepare of a child of a 1M-chunk parent < 1 ms and within 2x of a 1k-chunk parent (Cython)"
    alt = (_micro_figure(doc, "prepare_alternating[cython]") or {}).get("sizes") or {}
    big, small = _micro(doc, "prepare[cython-tmpfs-1M]"), _micro(doc, "prepare[cython-tmpfs-1k]")
    parts, b, r = [], None, None
    if "1M" in alt and "1k" in alt:
        b, s = alt["1M"]["median_s"], alt["1k"]["median_s"]
        r = _div(b, s)
        parts.append(f"{seconds(b)} (1k: {seconds(s)}, {ratio(r)}), tmpfs, sizes in turn, median")
    if big and small:
        seq_b, seq_s = big.get("median_s"), small.get("median_s")
        if r is None:
            b, r = seq_b, _div(seq_b, seq_s)
        parts.append(f"one size after another {seconds(seq_b)} (1k: {seconds(seq_s)})")
    disk = _micro(doc, "prepare[cython-disk-1M]")
    if disk:
        parts.append(f"on disk with fsync {seconds(disk.get('median_s'))}")
    if r is None or b is None:
        return Target(goal, "not measured", None)
    return Target(goal, "; ".join(parts), b < 1e-3 and r <= 2)


def _memory_target(doc: dict[str, Any]) -> Target:
    goal = "metadata memory ≤ 16 bytes per mapped chunk (Cython)"
    fig = _micro_figure(doc, "memory_per_chunk[cython]")
    if not fig:
        return Target(goal, "not measured", None)
    value = fig.get("bytes_per_chunk")
    return Target(goal, f"{value:.1f} B/chunk (RSS delta, {fig.get('chunks')} chunks)", value <= 16)


def _speedup_target(doc: dict[str, Any]) -> Target:
    goal = "Cython engine ≥ 10x pure Python on 4 KiB random reads and writes"
    found = []
    for name in ("rand_pread_4k", "rand_pwrite_4k", "rand_pwrite_4k_flushed"):
        c, p = _micro(doc, f"{name}[cython]"), _micro(doc, f"{name}[python]")
        if c and p:
            found.append((name, _div(p.get("per_op_s"), c.get("per_op_s"))))
    if len(found) < 3 or any(r is None for _, r in found):
        return Target(goal, "not measured", None)
    text = ", ".join(f"{n} {r:.1f}x" for n, r in found)
    c, p = _micro(doc, "cached_pread_4k[cython]"), _micro(doc, "cached_pread_4k[python]")
    cached = _div(p.get("per_op_s"), c.get("per_op_s")) if c and p else None
    if cached is not None:
        text += f" (the same 4 KiB block from cache, the engines' own cost per call: {cached:.1f}x)"
    return Target(goal, text, all(r >= 10 for _, r in found))


def _nbd_write_target(doc: dict[str, Any]) -> Target:
    goal = f"NBD 4 KiB random writes at depth {TARGET_CHAIN + 1}, 1 and 4 connections: ≥ 100 % of nbdkit"
    cases = [
        c
        for c in (doc.get("vs_qemu") or {}).get("nbd", [])
        if c.get("chain") == TARGET_CHAIN and c["job"].startswith("randwrite-4k")
    ]
    found = [(c["job"], (c.get("ratios") or {}).get("cowstore/nbdkit")) for c in cases]
    found = [(job, r) for job, r in found if r is not None]
    if not found:
        return Target(goal, "not run at this depth", None)
    return Target(goal, ", ".join(f"{job} {r:.0%}" for job, r in found), all(r >= 1.0 for _, r in found))


FUSE_GOALS = {
    "qemu-storage-daemon": {"randread-4k": 2.0, "randwrite-4k": 2.0, "read-1m": 1.0},
    "nbdfuse": {"randread-4k": 1.0, "randwrite-4k": 1.0, "read-1m": 1.0},
}
"""Per peer, the ratio each fio case of `cowstore mount` must reach (by the job's name prefix)."""


def _fuse_targets(doc: dict[str, Any]) -> list[Target]:
    section = doc.get("vs_fuse") or {}
    depth = (section.get("meta") or {}).get("depth", "?")
    out = []
    for peer, goals in FUSE_GOALS.items():
        goal = f"FUSE at depth {depth}, fio psync x4 vs {peer}: " + ", ".join(
            f"{case} ≥ {want:g}x" for case, want in goals.items()
        )
        found = []
        for c in section.get("fio") or []:
            want = next((w for case, w in goals.items() if c["job"].startswith(case)), None)
            r = (c.get("ratios") or {}).get(f"cowstore/{peer}")
            if want is not None and r is not None:
                found.append((c["job"].split("-psync")[0], r, want))
        measured = ", ".join(f"{job} {r:.2f}x" for job, r, _ in found) or "not run"
        out.append(Target(goal, measured, all(r >= w for _, r, w in found) if found else None))
    ext4 = section.get("ext4") or {}
    ratios = ext4.get("ratios") or {}
    goal = "ext4 on a loop device over the file, write + fsync and cold read: ≥ 1x nbdfuse"
    if ratios and None not in ratios.values():
        measured = ", ".join(f"{k.split()[-1].split('_')[0]} {v:.2f}x" for k, v in ratios.items())
        out.append(Target(goal, measured, all(v >= 1.0 for v in ratios.values())))
    else:
        out.append(Target(goal, "not run", None))
    return out


CONTAINERD_GOALS = (("import", "≤", 1.5), ("run", "≤", 1.2), ("cold read", "≥", 0.8))
"""Under containerd, each case's bound on cowstore / overlayfs (cases by name prefix)."""


def _containerd_targets(doc: dict[str, Any]) -> list[Target]:
    section = doc.get("vs_containerd") or {}
    cases = section.get("cases") or []
    out = []
    for prefix, sign, bound in CONTAINERD_GOALS:
        goal = f"containerd, {prefix}: cowstore {sign} {bound:g}x overlayfs"
        found = [
            (c["case"], (c.get("ratios") or {}).get("cowstore/overlayfs"))
            for c in cases
            if c["case"].startswith(prefix)
        ]
        found = [(case, r) for case, r in found if r is not None]
        met = all(r <= bound if sign == "≤" else r >= bound for _, r in found) if found else None
        out.append(Target(goal, ", ".join(f"{case} {r:.2f}x" for case, r in found) or "not run", met))
    out.append(_run_by_size_target(section))
    cfg = (section.get("meta") or {}).get("config") or {}
    written = (cfg.get("containers") or 0) * (cfg.get("write_mib") or 0) * 2**20
    growth = next((c for c in cases if c["case"] == "disk growth"), None)
    goal = "containerd, disk of containers writing N MiB each: cowstore ≤ 1.5x the bytes written"
    used = ((growth or {}).get("median") or {}).get("cowstore")
    if used is None or not written:
        out.append(Target(goal, "not run", None))
    else:
        native = (growth.get("median") or {}).get("native")
        text = f"{used / 2**20:.1f} MiB for {written / 2**20:.0f} MiB written ({used / written:.2f}x)"
        if native:
            text += f"; native {native / 2**20:.0f} MiB"
        out.append(Target(goal, text, used <= 1.5 * written))
    return out


RUN_BY_SIZE_BOUND = 1.2
"""`ctr run` on the largest image over the smallest, for cowstore: the start must not grow
with the image (native's copies it whole)."""


def _run_by_size_target(section: dict[str, Any]) -> Target:
    goal = f"containerd, run on the largest image / the smallest: cowstore ≤ {RUN_BY_SIZE_BOUND:g}x"
    sizes = {ref: info.get("bytes", 0) for ref, info in (section.get("images") or {}).items()}
    runs = {
        ref: (c.get("median") or {})
        for c in section.get("cases") or []
        for ref in sizes
        if c["case"] == f"run /bin/true {ref}"
    }
    if len(runs) < 2:
        return Target(goal, "not run", None)
    small, big = min(runs, key=sizes.__getitem__), max(runs, key=sizes.__getitem__)

    def ratio(who: str) -> float | None:
        a, b = runs[small].get(who), runs[big].get(who)
        return b / a if a and b else None

    mine = ratio("cowstore")
    if mine is None:
        return Target(goal, "not run", None)
    text = f"{runs[big]['cowstore'] * 1e3:.0f} vs {runs[small]['cowstore'] * 1e3:.0f} ms ({mine:.2f}x)"
    native = ratio("native")
    if native is not None:
        text += f"; native {native:.2f}x"
    return Target(goal, text, mine <= RUN_BY_SIZE_BOUND)


def targets(doc: dict[str, Any]) -> list[Target]:
    return [
        _nbd_target(doc),
        _nbd_write_target(doc),
        *_fuse_targets(doc),
        *_containerd_targets(doc),
        _inprocess_target(doc),
        _depth_target(doc),
        _prepare_target(doc),
        _memory_target(doc),
        _speedup_target(doc),
    ]


# -- markdown -----------------------------------------------------------------


def _inprocess_lines(vs: dict[str, Any]) -> list[str]:
    peers = [
        p
        for p in ("qemu-img-qd1", "qemu-img-qd16")
        if any(p in (c.get("median") or {}) for c in vs["inprocess"])
    ]
    headers = ["depth", "case", "cowstore", *peers, *(f"cowstore / {p}" for p in peers), "cowstore / memcpy"]
    rows = []
    for c in vs["inprocess"]:
        med = c.get("median") or {}
        unit = "B/s" if c["case"].startswith("seq") else "IOPS"
        scale = 1 if unit == "B/s" else 1 / c.get("block", 4096)
        fmt = [rate(None if med.get(n) is None else med[n] * scale, unit) for n in ("cowstore", *peers)]
        ratios = [ratio(_div(med.get("cowstore"), med.get(p))) for p in peers]
        whole, blocks = c.get("memcpy_fraction"), c.get("memcpy_blocks_fraction")
        frac = (
            "-"
            if whole is None
            else f"{whole:.0%}" + ("" if blocks is None else f" ({blocks:.0%} of 64K blocks)")
        )
        rows.append([str(c["depth"]), c["case"], *fmt, *ratios, frac])
    lines = [
        "## In process: Python API against `qemu-img bench` (page cache warm)",
        "",
        *_table(headers, rows),
    ]
    mem = vs.get("memcpy") or []
    if mem:
        lines += [
            "",
            f"memcpy bandwidth ({mem[0].get('method', '?')}, 64 MiB, best of 5, median over runs), by depth: "
            + ", ".join(
                f"{m['depth']}: {rate(m.get('median'))} (64K blocks {rate(m.get('median_blocks'))})"
                for m in mem
            )
            + ".",
        ]
    return lines


def _nbd_lines(vs: dict[str, Any]) -> list[str]:
    servers = ["cowstore", "qemu-nbd", "nbdkit"]
    headers = ["depth", "job", *servers, "cowstore / qemu-nbd", "cowstore / nbdkit"]
    rows = []
    for c in vs["nbd"]:
        med = c.get("median") or {}
        big = c["job"].startswith("read-1m")
        cells = []
        for s in servers:
            m = med.get(s) or {}
            cells.append(rate(m.get("bw_bytes")) if big else rate(m.get("iops"), "IOPS"))
        r = c.get("ratios") or {}
        rows.append(
            [
                str(c["depth"]),
                c["job"],
                *cells,
                ratio(r.get("cowstore/qemu-nbd")),
                ratio(r.get("cowstore/nbdkit")),
            ]
        )
    return [
        "## Over NBD: fio `--ioengine=nbd` (depth = chain + a fresh top; nbdkit serves it flattened)",
        "",
        *_table(headers, rows),
    ]


def fuse_lines(section: dict[str, Any]) -> list[str]:
    """The FUSE tables: fio cases against both peers, then ext4 over a loop device."""
    meta = section.get("meta") or {}
    cfg = meta.get("config") or {}
    names = ["cowstore", "qemu-storage-daemon", "nbdfuse"]
    rows = []
    for c in section.get("fio") or []:
        med = c.get("median") or {}
        big = c["job"].startswith("read-1m")
        cells = [
            rate((med.get(n) or {}).get("bw_bytes")) if big else rate((med.get(n) or {}).get("iops"), "IOPS")
            for n in names
        ]
        r = c.get("ratios") or {}
        direct = c.get("direct") or {}
        rows.append(
            [
                c["job"],
                *cells,
                ratio(r.get("cowstore/qemu-storage-daemon")),
                ratio(r.get("cowstore/nbdfuse")),
                ", ".join(n for n in names if not direct.get(n, True)) or "none",
            ]
        )
    lines = [
        f"## Over FUSE: fio psync on the file of depth {meta.get('depth', '?')} "
        f"({cfg.get('size', 0) / 2**20:.0f} MiB, {cfg.get('pairs')} alternating runs, median; "
        f"{meta.get('started', '?')}; {_build_text(meta)})",
        "",
        *_table(
            ["job", *names, "cowstore / qsd", "cowstore / nbdfuse", "O_DIRECT refused by"],
            rows,
        ),
    ]
    ext4 = section.get("ext4")
    if ext4:
        med = ext4.get("median") or {}
        r = ext4.get("ratios") or {}
        lines += [
            "",
            f"ext4 on a loop device over the file, {ext4.get('bytes', 0) / 2**20:.0f} MiB written with a "
            "final fsync, then read after dropping caches:",
            "",
            *_table(
                ["", *med.keys(), "cowstore / nbdfuse"],
                [
                    [
                        "write + fsync",
                        *(rate(m.get("write_bytes_per_s")) for m in med.values()),
                        ratio(r.get("cowstore/nbdfuse write_bytes_per_s")),
                    ],
                    [
                        "cold read",
                        *(rate(m.get("read_bytes_per_s")) for m in med.values()),
                        ratio(r.get("cowstore/nbdfuse read_bytes_per_s")),
                    ],
                ],
            ),
        ]
    return lines


def _containerd_cell(value: float | None, unit: str) -> str:
    if unit == "s":
        return seconds(value)
    if unit == "B":
        return "-" if value is None else f"{value / 2**20:.1f} MiB"
    return rate(value, unit)


def containerd_lines(section: dict[str, Any]) -> list[str]:
    """The containerd table: each case's median per snapshotter, and its ratio to overlayfs."""
    meta = section.get("meta") or {}
    cfg = meta.get("config") or {}
    names = list(section.get("contenders") or [])
    base = "overlayfs"
    others = [n for n in names if n != base]
    rows = []
    for c in section.get("cases") or []:
        med, r = c.get("median") or {}, c.get("ratios") or {}
        name = c["case"]
        if name == "cold read":
            read = meta.get("cold_read") or {}
            mib = read.get("bytes", 0) / 2**20
            name += f" ({len(read.get('paths') or [])} files, one a layer, {mib:.0f} MiB)"
        elif name == "disk growth":
            name += f" ({cfg.get('containers')} containers x {cfg.get('write_mib')} MiB written)"
        elif name == "disk image":
            name = "disk: the image unpacked"
        rows.append(
            [
                f"{name} ({c.get('better')} is better)",
                *(_containerd_cell(med.get(n), c["unit"]) for n in names),
                *(ratio(r.get(f"{n}/{base}")) for n in others),
            ]
        )
    imgs = section.get("images") or {}
    lines = [
        f"## Under containerd: snapshotters side by side (rounds: {cfg.get('rounds')}, order rotating, "
        f"median; {meta.get('started', '?')}; {_build_text(meta)})",
        "",
        "Images: "
        + "; ".join(
            f"{ref}: {i['layers']} layers, {i['files']} files, {i['bytes'] / 2**20:.0f} MiB"
            for ref, i in imgs.items()
        )
        + f". `ctr run` starts: {cfg.get('runs')} a round.",
        "",
        *_table(["case", *names, *(f"{n} / {base}" for n in others)], rows),
    ]
    return lines


def _micro_lines(micro: dict[str, Any]) -> list[str]:
    benches = micro.get("benchmarks") or {}
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in benches.items():
        label = key.replace(f"[{entry['engine']}-", "[").replace(f"[{entry['engine']}]", "")
        by_name.setdefault(label, {})[entry["engine"]] = entry
    rows = []
    for label, engines in sorted(
        by_name.items(), key=lambda kv: (next(iter(kv[1].values()))["group"], kv[0])
    ):
        c, p = engines.get("cython") or {}, engines.get("python") or {}
        speed = _div(p.get("per_op_s"), c.get("per_op_s"))
        rows.append(
            [
                label,
                seconds(c.get("per_op_s")),
                rate(c.get("bytes_per_s")) if c.get("bytes") else "",
                seconds(p.get("per_op_s")),
                rate(p.get("bytes_per_s")) if p.get("bytes") else "",
                ratio(speed),
            ]
        )
    lines = ["## Micro-benchmarks (pytest-benchmark, median per operation)", ""]
    lines += _table(["benchmark", "cython / op", "cython", "python / op", "python", "speedup"], rows)
    figures = micro.get("figures") or {}
    for key, fig in sorted(figures.items()):
        if key.startswith("read_depth_alternating"):
            depths = fig.get("depths") or {}
            first, last = depths.get("1"), depths.get(str(max(map(int, depths), default=1)))
            lines.append("")
            lines.append(
                f"{key} ({fig.get('rounds')} rounds, each reading every depth in turn; median): "
                + ", ".join(f"depth {d}: {rate(v['bytes_per_s'])}" for d, v in depths.items())
                + (
                    f"; deepest / depth 1 = {last['bytes_per_s'] / first['bytes_per_s']:.0%}"
                    if first and last
                    else ""
                )
            )
        if key.startswith("prepare_alternating"):
            lines.append("")
            lines.append(
                f"{key} ({fig.get('rounds')} rounds, each preparing on every parent size in turn, "
                f"{fig.get('where')}; median): "
                + ", ".join(
                    f"{c} chunks: {seconds(v['median_s'])}" for c, v in (fig.get("sizes") or {}).items()
                )
            )
        if key.startswith("memory_per_chunk"):
            lines.append("")
            lines.append(
                f"{key}: {fig['bytes_per_chunk']:.1f} B per mapped chunk "
                f"(RSS +{fig['rss_delta'] / 2**20:.1f} MiB for {fig['chunks']} chunks, "
                f"peak +{fig['peak_delta'] / 2**20:.1f} MiB, open {seconds(fig.get('open_s'))})"
            )
    return lines


def _build_text(meta: dict[str, Any]) -> str:
    build = meta.get("build") or {}
    text = f"cowstore {build.get('commit') or '?'}, extension {build.get('extension') or 'none'}"
    if meta.get("build_changed"):
        text += " (REBUILT during the run: figures mix two builds)"
    return text


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# cowstore benchmark results", ""]
    lines += _table(["target", "measured", "status"], [[t.goal, t.measured, t.status] for t in targets(doc)])
    vs = doc.get("vs_qemu")
    if vs:
        meta = vs.get("meta") or {}
        cfg = meta.get("config") or {}
        lines += [
            "",
            f"Side by side: {meta.get('started', '?')}, engine {meta.get('engine', '?')}, "
            f"volume {cfg.get('size', 0) / 2**20:.0f} MiB, {cfg.get('chunk', 0) // 1024} KiB chunks, "
            f"{cfg.get('inprocess_pairs')} (in process) and {cfg.get('pairs')} (NBD) alternating runs a case "
            f"(median), fio runtime {cfg.get('runtime')} s after a {cfg.get('ramp')} s ramp; "
            f"build {seconds(meta.get('build_s'))}, total {seconds(meta.get('seconds'))}; "
            f"{_build_text(meta)}.",
            "",
        ]
        if vs.get("inprocess"):
            lines += [*_inprocess_lines(vs), ""]
        if vs.get("nbd"):
            lines += [*_nbd_lines(vs), ""]
            nbd_meta = vs.get("meta_nbd")
            if nbd_meta:
                # A run of the NBD cases alone (vs_qemu.run without the in-process part),
                # merged over an earlier full run.
                lines += [
                    f"NBD rows from a later run: {nbd_meta.get('started', '?')}; {_build_text(nbd_meta)}.",
                    "",
                ]
    if doc.get("vs_fuse"):
        lines += [*fuse_lines(doc["vs_fuse"]), ""]
    if doc.get("vs_containerd"):
        lines += [*containerd_lines(doc["vs_containerd"]), ""]
    micro = doc.get("micro")
    if micro:
        meta = micro.get("meta") or {}
        lines += ["", f"Micro-benchmarks: {meta.get('finished', '?')}; {_build_text(meta)}.", ""]
        lines += _micro_lines(micro)
    return "\n".join(lines) + "\n"


# -- plot ---------------------------------------------------------------------


def draw(doc: dict[str, Any], path: Path) -> bool:
    """Throughput against chain depth, cowstore and qcow2 on one chart; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    vs = doc.get("vs_qemu") or {}
    fig, (seq, rnd) = plt.subplots(1, 2, figsize=(14, 7))

    def inproc(case: str, who: str, scale: float) -> tuple[list[int], list[float]]:
        pts = [
            (c["depth"], (c.get("median") or {}).get(who))
            for c in vs.get("inprocess", [])
            if c["case"] == case
        ]
        pts = [(d, v * scale) for d, v in pts if v]
        return [d for d, _ in pts], [v for _, v in pts]

    def nbd(job: str, who: str, field: str, scale: float) -> tuple[list[int], list[float]]:
        pts = [
            (c["chain"], ((c.get("median") or {}).get(who) or {}).get(field))
            for c in vs.get("nbd", [])
            if c["job"] == job
        ]
        pts = [(d, v * scale) for d, v in pts if v]
        return [d for d, _ in pts], [v for _, v in pts]

    styles = {
        "cowstore": ("tab:blue", "o"),
        "qemu-img-qd1": ("tab:red", "s"),
        "qemu-img-qd16": ("tab:orange", "s"),
        "qemu-nbd": ("tab:red", "^"),
        "nbdkit": ("tab:gray", "v"),
    }
    for who, label in (
        ("cowstore", "cowstore, Python API"),
        ("qemu-img-qd1", "qcow2, qemu-img bench -d 1"),
        ("qemu-img-qd16", "qcow2, qemu-img bench -d 16"),
    ):
        color, marker = styles[who]
        x, y = inproc("seq-64k", who, 1e-9)
        if x:
            seq.plot(x, y, marker=marker, color=color, label=f"{label}, 64K seq")
        x, y = inproc("rand-4k", who, 1 / 4096)
        if x:
            rnd.plot(x, y, marker=marker, color=color, label=f"{label}, 4K")
    for who, label in (
        ("cowstore", "cowstore serve"),
        ("qemu-nbd", "qcow2, qemu-nbd"),
        ("nbdkit", "flattened raw, nbdkit"),
    ):
        color, marker = styles[who]
        x, y = nbd("read-1m-qd4", who, "bw_bytes", 1e-9)
        if x:
            seq.plot(x, y, marker=marker, color=color, linestyle="--", label=f"{label}, NBD read 1M qd4")
        x, y = nbd("randread-4k-qd16", who, "iops", 1.0)
        if x:
            rnd.plot(x, y, marker=marker, color=color, linestyle="--", label=f"{label}, NBD randread 4k qd16")
    benches = ((doc.get("micro") or {}).get("benchmarks") or {}).values()
    for engine, color in (("cython", "tab:cyan"), ("python", "tab:purple")):
        pts = sorted(
            (e["params"]["depth"], e["bytes_per_s"] * 1e-9)
            for e in benches
            if e["name"] == "read_depth" and e["engine"] == engine and e.get("bytes_per_s")
        )
        if pts:
            seq.plot(
                [d for d, _ in pts],
                [v for _, v in pts],
                marker=".",
                color=color,
                linestyle=":",
                label=f"cowstore micro ({engine} engine), 64K seq",
            )
    seq.set_ylabel("GB/s")
    rnd.set_ylabel("IOPS")
    for ax, title in ((seq, "Sequential reads"), (rnd, "Random 4 KiB reads")):
        ax.set_xscale("log", base=2)
        depths = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
        if depths:
            ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("chain depth (layers; NBD serves a fresh top on the chain)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.suptitle("Read throughput against chain depth: cowstore and qcow2")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True
