"""`make demo`: through containerd where it can run (as in CI), else the in-process demo."""

from __future__ import annotations

import subprocess
import sys

from tests import tools
from tests.console import REPO
from tests.containerd import plugin


def run_module(name: str) -> subprocess.CompletedProcess[str]:
    """`python -m NAME` from the checkout; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", name], cwd=REPO, env=plugin.env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_make_demo_goes_through_containerd_and_leaves_an_empty_store():
    from demo.__main__ import why_not

    why = why_not()
    if why is not None:
        tools.unavailable(why)
    out = run_module("demo").stdout
    assert "imported cowstore.test/small:latest (4 layers)" in out
    assert "container web: wrote 8 MiB into its own layer; sees /web.bin ok" in out
    assert "container db: wrote 24 MiB into its own layer; sees /db.bin ok" in out
    assert "Every image layer is byte-identical" in out
    assert "0 snapshots left" in out
    assert "0 B after `cowstore compact`" in out


def test_the_in_process_demo_runs_and_checks_itself():
    assert "The image is unchanged by its containers' writes" in run_module("cowstore.demo").stdout
