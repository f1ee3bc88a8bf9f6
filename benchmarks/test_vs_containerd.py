"""The snapshotters under containerd (benchmarks/vs_containerd.py), run by `make bench`.

`COWSTORE_BENCH_QUICK=1` runs `--quick`; `COWSTORE_CONTAINERD_BENCH_ARGS` passes other
arguments. Outside CI it is skipped when a tool is missing or not root.
"""

from __future__ import annotations

import os
import shlex

from benchmarks import results, vs_containerd
from tests import tools


def test_vs_containerd(capsys):
    missing = vs_containerd.missing_tools()
    if missing:
        tools.unavailable(f"{', '.join(missing)} not installed")
    if os.geteuid() != 0:
        tools.unavailable("needs root (containerd, drop_caches)")
    argv = ["--quick"] if os.environ.get("COWSTORE_BENCH_QUICK") else []
    argv += shlex.split(os.environ.get("COWSTORE_CONTAINERD_BENCH_ARGS", ""))
    with capsys.disabled():
        assert vs_containerd.main(argv) == 0


def test_containerd_table_gives_each_contender_a_column_and_a_ratio_to_overlayfs():
    case = vs_containerd._case("run /bin/true", "s", "lower", {"overlayfs": [0.2, 0.1, 0.3], "native": [0.4]})
    section = {
        "cases": [case],
        "contenders": ["overlayfs", "native"],
        "meta": {"config": {"rounds": 3}},
    }
    lines = results.containerd_lines(section)
    assert "| case | overlayfs | native | native / overlayfs |" in lines
    assert "| run /bin/true (lower is better) | 200 ms | 400 ms | 2.00x |" in lines


def test_the_run_target_compares_the_largest_image_with_the_smallest():
    cases = [
        vs_containerd._case(
            f"run /bin/true {ref}", "s", "lower", {"overlayfs": [0.1], "native": [n], "cowstore": [c]}
        )
        for ref, n, c in (("small", 0.2, 0.12), ("big", 1.0, 0.15))
    ]
    section = {"cases": cases, "images": {"small": {"bytes": 1}, "big": {"bytes": 10}}}
    target = results._run_by_size_target(section)
    assert target.measured == "150 vs 120 ms (1.25x); native 5.00x"
    assert target.met is False
    cases[1]["median"]["cowstore"] = 0.13
    assert results._run_by_size_target(section).met is True
