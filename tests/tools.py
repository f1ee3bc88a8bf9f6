"""The system tools tests drive: a test that needs one may skip without it only outside CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import NoReturn

import pytest

TIMEOUT = 120


def unavailable(why: str) -> NoReturn:
    """What a test needs is missing: skip it, but fail in CI, which must run everything."""
    if os.environ.get("CI"):
        pytest.fail(f"CI cannot run this test: {why} (.ci/install-tools installs the tools; CI runs as root)")
    pytest.skip(why)


def need(*tools: str) -> None:
    """Skip (fail in CI) unless every tool is installed; root-only tools need root too."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed")
    if os.geteuid() != 0 and {"mount", "losetup", "fstrim"} & set(tools):
        unavailable("loop devices and mounts need root")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool (after `need`); a failure shows its output."""
    need(argv[0])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode:
        raise AssertionError(f"{argv} failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
