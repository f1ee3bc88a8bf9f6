"""The side-by-side against qemu (benchmarks/vs_qemu.py), run by `make bench` after the micro-benchmarks.

Full size by default (1 GiB, depths 1, 8, 32, 128), which takes a while;
`COWSTORE_BENCH_QUICK=1` runs `--quick`, and `COWSTORE_BENCH_ARGS` passes any other
arguments. Its progress prints as it goes. Outside CI it is skipped when qemu-utils, nbdkit
or fio is missing.
"""

from __future__ import annotations

import os
import shlex

import pytest

from benchmarks import peers, vs_qemu


def test_vs_qemu(capsys):
    missing = peers.missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed, and CI requires them")
        pytest.skip(f"{', '.join(missing)} not installed")
    argv = ["--quick"] if os.environ.get("COWSTORE_BENCH_QUICK") else []
    argv += shlex.split(os.environ.get("COWSTORE_BENCH_ARGS", ""))
    with capsys.disabled():
        assert vs_qemu.main(argv) == 0
