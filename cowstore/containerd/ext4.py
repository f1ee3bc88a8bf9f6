"""Formatting a snapshot file as the empty ext4 file system every new layer starts from, and
growing the ext4 of a snapshot that was made larger than its parent.

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


def _run(argv: list[str], what: str, ok: tuple[int, ...] = (0,)) -> None:
    """Run a tool; debugfs exits 0 after a failed request, so a message other than its
    banner on standard error fails too. `ok`: the exit codes that mean success."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    banner = f"{argv[0].rsplit('/', 1)[-1]} "
    complaints = [line for line in result.stderr.splitlines() if line and not line.startswith(banner)]
    if result.returncode not in ok or complaints:
        detail = (result.stderr or result.stdout).strip()
        raise FailedPrecondition(f"{what} failed (exit {result.returncode}): {detail}")


def format_empty(path: str) -> None:
    """Make `path` (a snapshot's file, all zeros) an empty ext4: root 0755, no lost+found."""
    _run([_tool("mkfs.ext4"), *MKFS_OPTIONS, path], f"mkfs.ext4 {path}")
    _run([_tool("debugfs"), "-w", "-R", "rmdir lost+found", path], f"removing lost+found in {path}")


def grow(path: str) -> None:
    """Grow the ext4 in `path` (a snapshot's file, just made larger) to fill the file.

    The file system is a committed layer, frozen while mounted, so its journal may still
    need replaying, and resize2fs wants a freshly checked file system: `e2fsck -f -p` first
    (replays and checks, fixing only what is safe; exit 1 means it fixed something). Both
    read metadata only, so this takes about as long as the file system has inodes in use.
    """
    _run([_tool("e2fsck"), "-f", "-p", path], f"e2fsck {path}", ok=(0, 1))
    _run([_tool("resize2fs"), path], f"resize2fs {path}")
