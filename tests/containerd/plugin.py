"""The cowstore snapshotter plugin as a contender: `cowstore --store DIR serve --containerd SOCK`.

containerd reaches it as the proxy snapshotter `NAME` (`daemon.Containerd(proxy_plugins={NAME:
SOCK})`); its data is the store directory, which must not be inside containerd's own
directory (the plugin's FUSE mount would count as containerd's leftover).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

NAME = "cowstore"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def command() -> list[str]:
    """`cowstore` through this interpreter, from this checkout (see `env`)."""
    return [sys.executable, "-m", "cowstore"]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
    }


def cli(
    store: Path, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`cowstore --store STORE ARGS`: through the plugin's control socket while it runs."""
    proc = subprocess.run(
        [*command(), "--store", str(store), *args], capture_output=True, text=True, env=env(), timeout=timeout
    )
    if check and proc.returncode:
        raise AssertionError(f"cowstore {' '.join(args)} failed with {proc.returncode}: {proc.stderr}")
    return proc


def snapshots(store: Path) -> list[dict]:
    """`cowstore ls --json`: every snapshot of the store, the plugin's internal ones too."""
    return json.loads(cli(store, "ls", "--json").stdout)


def containerd_key(name: str) -> str:
    """The key ctr shows for a name the plugin got from containerd (`<namespace>/<seq>/<key>`)."""
    return name.split("/", 2)[2]


def _accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def serving(store: Path, sock: Path, log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run the plugin on `sock` over the store `store` (created first when missing) until the block
    ends; stopped by its pid (SIGTERM, then SIGKILL)."""
    if not store.exists():
        subprocess.run([*command(), "--store", str(store), "init"], check=True, env=env(), timeout=120)
    log = log or sock.with_suffix(".log")
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [*command(), "--store", str(store), "serve", "--containerd", str(sock)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(),
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepting(sock):
            if process.poll() is not None:
                raise RuntimeError(
                    f"cowstore serve exited with {process.returncode}: {log.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"cowstore serve did not listen on {sock} within {START_TIMEOUT} s")
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
