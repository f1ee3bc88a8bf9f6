"""containerd end to end through a snapshotter: import the small image, run containers, collect.

Each snapshotter gets its own private containerd (tests/containerd/daemon.py). The built-in
`overlayfs` and `native` prove the harness; `cowstore` (the proxy plugin, tests/containerd/
plugin.py) must pass the same cases.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tools
from tests.containerd import daemon, images, plugin

SNAPSHOTTERS = (*daemon.BUILTIN_SNAPSHOTTERS, plugin.NAME)
TOP_DIRS = ("bin", "etc", "data")
LIST_TREE = (
    "cd / && find bin etc data -type d | sed 's/^/d /' && find bin etc data -type l | sed 's/^/l /'"
    " && find bin etc data -type f | xargs sha256sum | sed 's/^/f /'"
)


def need_tools() -> None:
    tools.need(*daemon.TOOLS, *images.TOOLS, "mount", "sed")
    missing = images.missing_tools()
    if missing:
        tools.need(*missing)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> images.Image:
    need_tools()
    return images.small_image(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module", params=SNAPSHOTTERS)
def snapshotter(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def ctrd(snapshotter: str, small: images.Image) -> Iterator[daemon.Containerd]:
    """A private containerd (with the plugin behind it for cowstore); nothing may be left after it."""
    workdir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            proxies = {}
            if snapshotter == plugin.NAME:
                # Beside containerd's directory, not in it: what containerd leaves there is a
                # leftover, and the plugin's own FUSE mount is not.
                (workdir / "plugin").mkdir()
                sock = workdir / "plugin" / "plugin.sock"
                stack.enter_context(plugin.serving(workdir / "plugin" / "store", sock))
                proxies = {plugin.NAME: sock}
            (workdir / "containerd").mkdir()
            c = stack.enter_context(daemon.Containerd(workdir / "containerd", proxies))
            yield c
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert not c.leftovers, f"had to force away: {c.leftovers}"
    assert daemon.namespace_cgroups(c.namespace) == []


@pytest.fixture
def imported(ctrd: daemon.Containerd, snapshotter: str, small: images.Image) -> images.Image:
    if small.ref not in ctrd.ctr("images", "ls", "-q").stdout.split():
        ctrd.ctr("images", "import", "--snapshotter", snapshotter, str(small.archive))
    return small


def parse_tree(listing: str) -> dict[str, str]:
    """`LIST_TREE`'s output as path → "dir", "symlink" or the file's sha256."""
    tree = {}
    for line in listing.splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "f":
            digest, path = rest.split(maxsplit=1)
            tree[path] = digest
        elif kind in ("d", "l"):
            tree[rest] = {"d": "dir", "l": "symlink"}[kind]
    return tree


def expected(tree: images.Tree) -> dict[str, str]:
    out = {}
    for path, entry in tree.items():
        if path.split("/")[0] in TOP_DIRS:
            out[path] = entry.sha256 if entry.kind == "file" else entry.kind
    return {**out, **{d: "dir" for d in TOP_DIRS}}


def comparable(tree: images.Tree) -> dict[str, tuple]:
    return {p: (e.kind, e.mode, e.size, e.sha256, e.target) for p, e in tree.items()}


def test_import_commits_one_snapshot_per_layer_named_by_chain_id(
    ctrd: daemon.Containerd, snapshotter: str, imported: images.Image
) -> None:
    assert set(imported.chain_ids()) <= set(ctrd.snapshots(snapshotter))
    listing = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout
    kinds = {line.split()[0]: line.split()[-1] for line in listing.splitlines()[1:]}
    assert all(kinds[c] == "Committed" for c in imported.chain_ids())


def test_each_layer_snapshot_holds_the_image_tree_up_to_that_layer(
    ctrd: daemon.Containerd, snapshotter: str, imported: images.Image, tmp_path: Path
) -> None:
    """Views of every layer, made before any is removed: a removal triggers containerd's GC, which
    collects views that nothing references (`ctr snapshots view` takes no lease). A collection
    still due (the import's lease went away) is run first, so none comes while they are mounted."""
    ctr = ("snapshots", "--snapshotter", snapshotter)
    ctrd.collect()
    views = {}
    try:
        for n, chain_id in enumerate(imported.chain_ids()):
            views[n] = json.loads(ctrd.ctr(*ctr, "view", "--mounts", f"verify-layer-{n}", chain_id).stdout)
        for n, mounts in views.items():
            with daemon.mounted(mounts, tmp_path / f"layer{n}") as root:
                assert comparable(images.walk(root)) == comparable(imported.layers[n]), f"layer {n}"
    finally:
        for n in views:
            ctrd.ctr(*ctr, "rm", f"verify-layer-{n}", check=False)
    assert not [key for key in ctrd.snapshots(snapshotter) if key.startswith("verify-layer-")]


def test_container_sees_every_layer_and_not_what_a_later_layer_deleted(
    ctrd: daemon.Containerd, snapshotter: str, imported: images.Image
) -> None:
    script = (
        "cat /data/base.txt /data/added.txt /data/changed.txt && test ! -e /data/doomed.txt"
        " && test ! -e /data/doomed-dir && test -x /data/chmod.sh && echo ok"
    )
    out = ctrd.run_container(imported.ref, "reader", "/bin/sh", "-c", script, snapshotter=snapshotter).stdout
    assert out.splitlines() == [
        "from the base layer",
        "added by layer 2",
        "layer 4 rewrote this file, longer than before",
        "ok",
    ]
    listing = ctrd.run_container(imported.ref, "lister", "/bin/sh", "-c", LIST_TREE, snapshotter=snapshotter)
    assert parse_tree(listing.stdout) == expected(imported.tree)


def test_writes_stay_in_the_container_layer_and_a_second_container_does_not_see_them(
    ctrd: daemon.Containerd, snapshotter: str, imported: images.Image
) -> None:
    write = (
        "dd if=/dev/urandom of=/data/mine bs=64k count=32 2>/dev/null && rm /data/base.txt"
        " && echo rewritten > /data/changed.txt && rm -r /data/added-dir && cat /data/changed.txt"
    )
    out = ctrd.run_container(
        imported.ref, "writer", "/bin/sh", "-c", write, snapshotter=snapshotter, rm=False
    )
    try:
        assert out.stdout == "rewritten\n"
        assert "writer" in ctrd.snapshots(snapshotter)
        usage = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "usage", "-b", "writer").stdout
        assert int(usage.splitlines()[1].split()[1]) >= 2 << 20
        listing = ctrd.run_container(
            imported.ref, "second", "/bin/sh", "-c", LIST_TREE, snapshotter=snapshotter
        )
        assert parse_tree(listing.stdout) == expected(imported.tree)
    finally:
        ctrd.ctr("containers", "rm", "writer")
    assert "writer" not in ctrd.snapshots(snapshotter)


def test_usage_of_each_layer_counts_the_bytes_it_added(
    ctrd: daemon.Containerd, snapshotter: str, imported: images.Image
) -> None:
    out = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "usage", "-b", *imported.chain_ids()).stdout
    sizes = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[1:]}
    base, added = imported.chain_ids()[:2]
    assert sizes[base] >= images.BUSYBOX.stat().st_size
    assert sizes[added] >= 100 * images.KiB


def test_removing_the_image_lets_gc_remove_every_snapshot(
    ctrd: daemon.Containerd, snapshotter: str, imported: images.Image
) -> None:
    ctrd.run_container(imported.ref, "last", "/bin/true", snapshotter=snapshotter)
    assert ctrd.snapshots(snapshotter)
    ctrd.gc()
    assert ctrd.snapshots(snapshotter) == []
    assert ctrd.ctr("images", "ls", "-q").stdout.split() == []
    if snapshotter in daemon.BUILTIN_SNAPSHOTTERS:
        assert list((ctrd.snapshotter_root(snapshotter) / "snapshots").iterdir()) == []
