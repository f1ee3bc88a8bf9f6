"""The FUSE side-by-side (benchmarks/vs_fuse.py), run by `make bench` after the NBD one.

`COWSTORE_BENCH_QUICK=1` runs `--quick`; `COWSTORE_FUSE_BENCH_ARGS` passes other arguments.
Outside CI it is skipped when a peer is missing or not root.
"""

from __future__ import annotations

import os
import shlex

from benchmarks import vs_fuse
from tests import tools


def test_vs_fuse(capsys):
    missing = vs_fuse.missing_tools()
    if missing:
        tools.unavailable(f"{', '.join(missing)} not installed")
    if os.geteuid() != 0:
        tools.unavailable("needs root (loop devices)")
    argv = ["--quick"] if os.environ.get("COWSTORE_BENCH_QUICK") else []
    argv += shlex.split(os.environ.get("COWSTORE_FUSE_BENCH_ARGS", ""))
    with capsys.disabled():
        assert vs_fuse.main(argv) == 0
