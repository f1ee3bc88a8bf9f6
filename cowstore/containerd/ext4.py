"""Formatting a snapshot file as the empty ext4 file system every new layer starts from.

Done once per size (the template): mkfs.ext4 trusts the fresh volume to read as zeros
(`assume_storage_prezeroed`, e2fsprogs 1.47) so it writes only metadata, in a few
hundredths of a second, and discards nothing. `lost+found` is removed, since containerd
compares layer contents with what was unpacked into them.
"""

from __future__ import annotations

import shutil
import subprocess

from ..errors import FailedPrecondition

# Metadata only: the volume reads as zeros, so nothing is discarded or zeroed; no reserved blocks.
MKFS_OPTIONS = [
    "-q",
    "-F",
    "-t",
    "ext4",
    "-m",
    "0",
    "-E",
    "nodiscard,assume_storage_prezeroed=1,root_owner=0:0",
]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise FailedPrecondition(f"{name} is not installed (apt-get install e2fsprogs)")
    return path


def _run(argv: list[str], what: str) -> None:
    """Run a tool; debugfs exits 0 after a failed request, so a message other than its
    banner on standard error fails too."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    complaints = [line for line in result.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if result.returncode != 0 or complaints:
        detail = (result.stderr or result.stdout).strip()
        raise FailedPrecondition(f"{what} failed (exit {result.returncode}): {detail}")


def format_empty(path: str) -> None:
    """Make `path` (a snapshot's file, all zeros) an empty ext4: root 0755, no lost+found."""
    _run([_tool("mkfs.ext4"), *MKFS_OPTIONS, path], f"mkfs.ext4 {path}")
    _run([_tool("debugfs"), "-w", "-R", "rmdir lost+found", path], f"removing lost+found in {path}")
