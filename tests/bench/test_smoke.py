"""Smoke runs of the benchmark harness at tiny sizes: it completes and writes well-formed results.

Benchmarks never assert a time, and neither does this: it checks the shape of what the
side-by-side (benchmarks/vs_qemu.py) and the results renderer produce. The side-by-side
drives qemu-img, qemu-io, qemu-nbd, nbdkit and fio; outside CI it is skipped when one is
missing.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import peers, results, vs_qemu

SMOKE_JOBS = "randread-4k-qd16,randwrite-4k-qd16-x2"


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture
def tools() -> None:
    missing = peers.missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed, and CI requires them")
        pytest.skip(f"{', '.join(missing)} not installed")


def test_vs_qemu_runs_at_tiny_sizes_and_writes_results(tools, tmp_path, capsys):
    out = tmp_path / "results"
    argv = [
        "--size",
        "16M",
        "--depths",
        "1,2",
        "--nbd-depths",
        "2",
        "--pairs",
        "1",
        "--inprocess-pairs",
        "1",
        "--runtime",
        "0.3",
        "--ramp",
        "0",
        "--numjobs",
        "2",
        "--jobs",
        SMOKE_JOBS,
        "--rand-ops",
        "1024",
        "--seq-bytes",
        "32M",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(out),
    ]
    assert vs_qemu.main(argv) == 0
    assert not any((tmp_path / "work").iterdir()), "the work directory was not cleaned up"

    doc = json.loads((out / results.JSON_NAME).read_text())
    vs = doc["vs_qemu"]
    assert {(c["depth"], c["case"]) for c in vs["inprocess"]} == {
        (d, c) for d in (1, 2) for c in ("seq-64k", "rand-4k")
    }
    for case in vs["inprocess"]:
        assert set(case["median"]) == {"cowstore", "qemu-img-qd1", "qemu-img-qd16"}
        assert all(_positive(v) for v in case["median"].values()), case
        assert all(_positive(v) for v in case["ratios"].values()), case
    assert [m["depth"] for m in vs["memcpy"]] == [1, 2] and all(_positive(m["median"]) for m in vs["memcpy"])

    assert sorted(c["job"] for c in vs["nbd"]) == sorted(SMOKE_JOBS.split(","))
    for case in vs["nbd"]:
        assert (case["depth"], case["chain"]) == (3, 2)
        assert set(case["median"]) == set(vs_qemu.SERVERS)
        for figures in case["median"].values():
            assert _positive(figures["iops"]) and _positive(figures["bw_bytes"]), case
        assert set(case["ratios"]) == {"cowstore/qemu-nbd", "cowstore/nbdkit"}
        assert all(_positive(v) for v in case["ratios"].values()), case
    assert vs["meta"]["engine"] in ("cython", "python")

    assert [t["goal"] for t in doc["targets"]] == [t.goal for t in results.targets({})]
    assert all(set(t) == {"goal", "measured", "met"} for t in doc["targets"])
    md = (out / results.MD_NAME).read_text()
    assert "| depth | job |" in md and "randwrite-4k-qd16-x2" in md and "| target |" in md
    png = out / results.PNG_NAME
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cowstore / nbdkit" in capsys.readouterr().out


def _entry(name: str, engine: str, per_op: float, *, params: dict | None = None, nbytes: int = 4096) -> dict:
    return {
        "group": name,
        "name": name,
        "engine": engine,
        "params": params or {},
        "ops": 1,
        "bytes": nbytes,
        "median_s": per_op,
        "per_op_s": per_op,
        "bytes_per_s": nbytes / per_op,
    }


def test_micro_section_renders_and_targets_are_judged(tmp_path):
    benches = {
        "rand_pread_4k[cython]": _entry("rand_pread_4k", "cython", 1e-6),
        "rand_pread_4k[python]": _entry("rand_pread_4k", "python", 20e-6),
        "rand_pwrite_4k[cython]": _entry("rand_pwrite_4k", "cython", 2e-6),
        "rand_pwrite_4k[python]": _entry("rand_pwrite_4k", "python", 10e-6),
        "rand_pwrite_4k_flushed[cython]": _entry("rand_pwrite_4k_flushed", "cython", 3e-6),
        "rand_pwrite_4k_flushed[python]": _entry("rand_pwrite_4k_flushed", "python", 15e-6),
        "read_depth[cython-1]": _entry("read_depth", "cython", 1e-5, params={"depth": 1}, nbytes=65536),
        "read_depth[cython-1024]": _entry(
            "read_depth", "cython", 1.05e-5, params={"depth": 1024}, nbytes=65536
        ),
        "prepare[cython-tmpfs-1k]": _entry(
            "prepare", "cython", 2e-4, params={"where": "tmpfs", "chunks": "1k"}
        ),
        "prepare[cython-tmpfs-1M]": _entry(
            "prepare", "cython", 3e-4, params={"where": "tmpfs", "chunks": "1M"}
        ),
    }
    figures = {
        "memory_per_chunk[cython]": {
            "bytes_per_chunk": 20.0,
            "chunks": 1 << 20,
            "rss_delta": 20 << 20,
            "peak_delta": 30 << 20,
            "open_s": 0.1,
        }
    }
    doc = results.update("micro", {"benchmarks": benches, "figures": figures}, tmp_path, plot=False)
    status = {t["goal"].split(" ")[0] + t["goal"].split(" ")[1]: t["met"] for t in doc["targets"]}
    assert status == {
        "everyNBD": None,
        "NBD4": None,
        "FUSEat": None,
        "ext4on": None,
        "containerd,import:": None,
        "containerd,run:": None,
        "containerd,cold": None,
        "containerd,run": None,
        "containerd,disk": None,
        "inprocess": None,
        "readthroughput": True,
        "prepareof": True,
        "metadatamemory": False,
        "Cythonengine": False,
    }
    doc = results.update(
        "micro",
        {"benchmarks": {"extra[cython]": _entry("extra", "cython", 1e-6)}},
        tmp_path,
        merge=True,
        plot=False,
    )
    assert set(doc["micro"]["benchmarks"]) == {*benches, "extra[cython]"}
    md = (tmp_path / results.MD_NAME).read_text()
    assert "| rand_pread_4k |" in md and "20.0x" in md and "MISSED" in md
