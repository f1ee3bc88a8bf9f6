"""Faults around the cowstore plugin under a private containerd: the plugin killed (SIGKILL)
in the middle of `ctr images import` and started again on the same store and socket, and
containerd restarted while the plugin runs. Each time containerd must carry on by itself, the
image must run, the store must check clean, and once containerd has nothing left the store
must be empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowstore.containerd import loop
from tests.containerd import daemon, images, plugin
from tests.containerd.test_harness import need_tools

SNAPSHOTTER = plugin.NAME
BIG = images.BENCH_QUICK
"""40 MiB in 5 layers: an import long enough to be killed in the middle."""
SIZE = "256M"
RECONNECT_TIMEOUT = 120.0
KILL_TIMEOUT = 300.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short path (Unix sockets) for containerd and the plugin's store."""
    need_tools()
    path = Path(tempfile.mkdtemp(prefix="ctrf-", dir="/tmp"))
    (path / "plugin").mkdir()
    plugin.cli(path / "plugin" / "store", "init", "--default-size", SIZE)
    try:
        yield path
    finally:
        leftovers = daemon.cleanup(path, path / "containerd" / "containerd.sock", "none")
        shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"had to force away: {leftovers}"


def ctr_argv(ctrd: daemon.Containerd, *args: str) -> list[str]:
    return ["ctr", "--address", str(ctrd.address), "--namespace", ctrd.namespace, *args]


def layers_in(files: Path) -> tuple[int, bool]:
    """(committed layers, whether one is being extracted) as the plugin's FUSE files show them."""
    try:
        names = os.listdir(files)
    except OSError:
        return 0, False
    extracting = any("extract" in n for n in names)
    committed = [n for n in names if "extract" not in n and not n.startswith("cowstore.containerd")]
    return len(committed), extracting


def reaches_plugin(ctrd: daemon.Containerd, probe: str) -> bool:
    """Whether containerd gets a Prepare through to the plugin (`ctr snapshots ls` would not:
    containerd lists from its own metadata); the probe snapshot is removed again."""
    ctr = ("snapshots", "--snapshotter", SNAPSHOTTER)
    if ctrd.ctr(*ctr, "prepare", probe, check=False, timeout=60).returncode:
        return False
    ctrd.ctr(*ctr, "rm", probe)
    return True


def wait_until_reachable(ctrd: daemon.Containerd) -> float:
    """Seconds until containerd reaches the plugin again (it reconnects by itself)."""
    start = time.monotonic()
    while time.monotonic() - start < RECONNECT_TIMEOUT:
        if reaches_plugin(ctrd, "probe-after"):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"containerd did not reach the restarted plugin within {RECONNECT_TIMEOUT} s")


def assert_image_runs(ctrd: daemon.Containerd, image: images.Image, name: str) -> None:
    """A container reads the first and last layer's large files, and they hold the image's bytes."""
    paths = [images.bench_large_file(BIG, 0), images.bench_large_file(BIG, BIG.layers - 1)]
    out = ctrd.run_container(
        image.ref, name, "/bin/sh", "-c", "cd / && sha256sum " + " ".join(paths), snapshotter=SNAPSHOTTER
    )
    sums = {line.split()[1]: line.split()[0] for line in out.stdout.splitlines()}
    assert sums == {p: image.tree[p].sha256 for p in paths}


def assert_empty_once_collected(ctrd: daemon.Containerd, store: Path) -> None:
    ctrd.gc()
    assert ctrd.snapshots(SNAPSHOTTER) == []
    assert plugin.snapshots(store) == [], "the store must be empty, the internal template too"
    report = json.loads(plugin.cli(store, "check", "--json").stdout)
    assert (report["corruptions"], report["leaks"]) == (0, 0), report


@pytest.mark.parametrize(
    ("committed", "mounted"),
    [(0, False), (2, True), (3, True)],
    # A kill that misses the fourth layer's window still lands in the fifth (the last).
    ids=["first-layer-before-mount", "third-layer-mounted", "fourth-layer-mounted"],
)
def test_plugin_killed_mid_import_restarts_on_the_same_socket_and_containerd_reconnects(
    workdir: Path, committed: int, mounted: bool
) -> None:
    """SIGKILL once layer `committed` + 1 is prepared (`mounted`: once containerd has mounted
    it to extract into; the kill then lands in the extraction or the Commit); the import fails;
    the plugin starts again on the same store and socket; containerd reaches it without being
    restarted; the import done again runs, and the store checks clean."""
    image = images.bench_image(BIG)
    store, sock = workdir / "plugin" / "store", workdir / "plugin" / "plugin.sock"
    with contextlib.ExitStack() as plugins:
        first = plugins.enter_context(plugin.serving(store, sock))
        with daemon.Containerd(workdir / "containerd", {SNAPSHOTTER: sock}) as ctrd:
            assert ctrd.process is not None
            containerd_pid = ctrd.process.pid
            importing = subprocess.Popen(
                ctr_argv(ctrd, "images", "import", "--snapshotter", SNAPSHOTTER, str(image.archive)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=ctrd.env,
            )
            try:
                deadline = time.monotonic() + KILL_TIMEOUT
                while True:
                    done, extracting = layers_in(store / "files")
                    if (
                        extracting
                        and done >= committed
                        and (not mounted or loop.mount_points(loop.under(str(store / "files"))))
                    ):
                        break
                    assert importing.poll() is None, f"the import ended before the kill: {importing.stdout}"
                    assert time.monotonic() < deadline, "the import never reached the layer to kill in"
                    time.sleep(0.005)
                first.kill()
                first.wait()
                output, _ = importing.communicate(timeout=KILL_TIMEOUT)
            finally:
                if importing.poll() is None:
                    importing.kill()
                    importing.wait()
            assert importing.returncode != 0, f"the import survived the plugin's death: {output}"
            assert not reaches_plugin(ctrd, "probe-while-dead")

            plugins.enter_context(plugin.serving(store, sock))
            wait_until_reachable(ctrd)
            assert ctrd.process is not None and ctrd.process.pid == containerd_pid
            report = json.loads(plugin.cli(store, "check", "--json").stdout)
            assert (report["corruptions"], report["leaks"]) == (0, 0), report

            ctrd.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(image.archive))
            assert set(image.chain_ids()) <= set(ctrd.snapshots(SNAPSHOTTER))
            assert_image_runs(ctrd, image, "after-kill")
            assert_empty_once_collected(ctrd, store)
        assert not ctrd.leftovers, f"had to force away: {ctrd.leftovers}"


def test_containerd_restarted_while_the_plugin_runs_still_runs_the_image(workdir: Path) -> None:
    """SIGTERM containerd and start it again on the same root and state: the image, and a
    container made before, are still there and run."""
    image = images.bench_image(BIG)
    store, sock = workdir / "plugin" / "store", workdir / "plugin" / "plugin.sock"
    with plugin.serving(store, sock) as served:
        with daemon.Containerd(workdir / "containerd", {SNAPSHOTTER: sock}) as ctrd:
            ctrd.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(image.archive))
            ctrd.run_container(image.ref, "kept", "/bin/true", snapshotter=SNAPSHOTTER, rm=False)
            before = sorted(ctrd.snapshots(SNAPSHOTTER))
            assert ctrd.process is not None
            ctrd.process.send_signal(signal.SIGTERM)
            assert ctrd.process.wait(daemon.STOP_TIMEOUT) == 0
            ctrd.start()
            assert served.poll() is None
            assert sorted(ctrd.snapshots(SNAPSHOTTER)) == before
            assert_image_runs(ctrd, image, "after-restart")
            ctrd.ctr("containers", "rm", "kept")
            assert_empty_once_collected(ctrd, store)
        assert not ctrd.leftovers, f"had to force away: {ctrd.leftovers}"
