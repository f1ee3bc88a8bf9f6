"""`make demo`: through containerd where it can run (as in CI), else the in-process demo."""

from __future__ import annotations

import subprocess
import sys

from tests.console import REPO
from tests.containerd import plugin


def test_make_demo_goes_through_containerd_and_leaves_an_empty_store(tmp_path):
    from demo.__main__ import why_not

    assert why_not() is None, "CI can run containerd: the demo must take that road"
    proc = subprocess.run(
        [sys.executable, "-m", "demo"],
        cwd=REPO,
        env=plugin.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "imported cowstore.test/small:latest (4 layers)" in out
    assert "container web: wrote 8 MiB into its own layer; sees /web.bin ok" in out
    assert "container db: wrote 24 MiB into its own layer; sees /db.bin ok" in out
    assert "Every image layer is byte-identical" in out
    assert "0 snapshots left" in out


def test_the_in_process_demo_runs_and_checks_itself():
    proc = subprocess.run(
        [sys.executable, "-m", "cowstore.demo"],
        cwd=REPO,
        env=plugin.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "The image is unchanged by its containers' writes" in proc.stdout
