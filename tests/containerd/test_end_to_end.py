"""cowstore under a private containerd, end to end, checked from cowstore's side: the layers'
bytes never change under containers, `ctr snapshots` agrees with `cowstore ls` and `usage`,
and once containerd has nothing left the store is empty and the stopped plugin leaves no mount
and no loop device.

The cases run in order on one containerd and one plugin (the last one stops them);
tests/containerd/test_harness.py runs the cases every snapshotter shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowstore.containerd.snapshotter import is_internal
from cowstore.fuse import file_name
from tests.containerd import daemon, images, plugin
from tests.containerd.test_harness import need_tools

SNAPSHOTTER = plugin.NAME
SIZE = "256M"


@dataclass
class Stack:
    """containerd with the plugin behind it, and the plugin's store."""

    workdir: Path
    store: Path
    ctrd: daemon.Containerd
    plugin: subprocess.Popen[bytes]
    image: images.Image

    def file(self, name: str) -> Path:
        """The FUSE file of the store's snapshot `name`."""
        return self.store / "files" / file_name(name)

    def layers(self) -> dict[str, str]:
        """Chain ID → the store's name of that committed layer."""
        names = {
            plugin.containerd_key(s["name"]): s["name"]
            for s in plugin.snapshots(self.store)
            if not is_internal(s["name"])
        }
        return {c: names[c] for c in self.image.chain_ids()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_tools()
    image = images.small_image(tmp_path_factory.mktemp("images"))
    workdir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    (workdir / "plugin").mkdir()
    store, sock = workdir / "plugin" / "store", workdir / "plugin" / "plugin.sock"
    plugin.cli(store, "init", "--default-size", SIZE)  # small files: hashed whole below
    try:
        with contextlib.ExitStack() as stack:
            process = stack.enter_context(plugin.serving(store, sock))
            ctrd = stack.enter_context(daemon.Containerd(workdir / "containerd", {SNAPSHOTTER: sock}))
            ctrd.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(image.archive))
            yield Stack(workdir, store, ctrd, process, image)
        assert not ctrd.leftovers, f"had to force away: {ctrd.leftovers}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_containers_read_every_layer_write_their_own_and_leave_the_layers_byte_identical(
    stack: Stack,
) -> None:
    layers = stack.layers()
    before = {c: sha256(stack.file(name)) for c, name in layers.items()}
    base = stack.image.chain_ids()[0]
    exported = subprocess.run(  # through the daemon's control socket
        [*plugin.command(), "--store", str(stack.store), "export", layers[base], "-"],
        capture_output=True,
        env=plugin.env(),
        timeout=600,
        check=True,
    )
    assert hashlib.sha256(exported.stdout).hexdigest() == before[base]
    script = (
        "cat /data/base.txt /data/added.txt /data/changed.txt && test ! -e /data/doomed.txt"
        " && dd if=/dev/urandom of=/data/mine bs=64k count=16 2>/dev/null && rm /data/base.txt"
        " && echo mine > /data/changed.txt && rm /bin/cat && sync && echo wrote"
    )
    out = stack.ctrd.run_container(
        stack.image.ref, "writer", "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER
    )
    assert out.stdout.splitlines() == [
        "from the base layer",
        "added by layer 2",
        "layer 4 rewrote this file, longer than before",
        "wrote",
    ]
    look = "test ! -e /data/mine && cat /data/base.txt /data/changed.txt && test -e /bin/cat && echo clean"
    out = stack.ctrd.run_container(stack.image.ref, "second", "/bin/sh", "-c", look, snapshotter=SNAPSHOTTER)
    assert out.stdout.splitlines() == [
        "from the base layer",
        "layer 4 rewrote this file, longer than before",
        "clean",
    ]
    assert {c: sha256(stack.file(name)) for c, name in stack.layers().items()} == before


def test_ctr_snapshots_ls_and_usage_match_what_cowstore_reports(stack: Stack) -> None:
    write = "dd if=/dev/urandom of=/data/kept bs=64k count=24 2>/dev/null && sync"
    stack.ctrd.run_container(
        stack.image.ref, "kept", "/bin/sh", "-c", write, snapshotter=SNAPSHOTTER, rm=False
    )
    try:
        listing = stack.ctrd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]
        ctr_view = {}
        for line in listing:
            fields = line.split()
            key, kind = fields[0], fields[-1]
            parent = fields[1] if len(fields) == 3 else ""
            ctr_view[key] = (parent, kind.lower())
        ours, names = {}, {}
        for s in plugin.snapshots(stack.store):
            if is_internal(s["name"]):
                continue  # the template: containerd never sees it
            key, parent = plugin.containerd_key(s["name"]), s["parent"] or ""
            ours[key] = ("" if is_internal(parent) else plugin.containerd_key(parent), s["kind"])
            names[key] = s["name"]
        assert ctr_view == ours
        assert ctr_view["kept"] == (stack.image.chain_ids()[-1], "active")
        keys = sorted(ctr_view)
        usage = stack.ctrd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", "-b", *keys).stdout
        ctr_sizes = {line.split()[0]: int(line.split()[1]) for line in usage.splitlines()[1:]}
        cowstore_sizes = {
            k: json.loads(plugin.cli(stack.store, "usage", "--json", names[k]).stdout)["size"] for k in keys
        }
        assert ctr_sizes == cowstore_sizes
        assert ctr_sizes["kept"] >= 24 * 64 << 10
    finally:
        stack.ctrd.ctr("containers", "rm", "kept")


def test_removing_every_image_empties_the_store_and_the_stopped_plugin_leaves_no_mount_or_loop(
    stack: Stack,
) -> None:
    stack.ctrd.gc()
    assert stack.ctrd.snapshots(SNAPSHOTTER) == []
    assert plugin.snapshots(stack.store) == [], "the store must be empty, the internal template too"
    assert plugin.cli(stack.store, "check").returncode == 0
    assert stack.ctrd.stop() == []
    stack.plugin.send_signal(signal.SIGTERM)
    assert stack.plugin.wait(plugin.STOP_TIMEOUT) == 0
    assert daemon.mounts_under(stack.workdir) == []
    assert daemon.loops_under(stack.workdir) == []
    assert plugin.snapshots(stack.store) == []  # the store opened directly now
