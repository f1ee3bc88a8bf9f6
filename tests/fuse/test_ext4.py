"""Layers as files, the way users and containerd will use them: ext4 made with mkfs.ext4,
filled with debugfs and through a loop mount, checked with e2fsck, compared with cowstore's
own export and with qemu-img's reading of an equivalent qcow2 chain, trimmed with fstrim."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

from cowstore.rawimage import export_volume
from tests.fuse.conftest import CHUNK, Mounted, loop_mounted, sha256
from tests.tools import need, run

MiB = 1 << 20
SIZE = 64 * MiB


def debugfs_write(image: Path, files: dict[str, bytes], scratch: Path) -> None:
    """Write `files` (path -> contents) into the ext4 in `image` with `debugfs -w`."""
    commands = []
    for i, (name, data) in enumerate(sorted(files.items())):
        source = scratch / f"src{i}"
        source.write_bytes(data)
        parts = name.split("/")
        for depth in range(1, len(parts)):
            commands.append(f"mkdir {'/'.join(parts[:depth])}")
        commands.append(f"write {source} {name}")
    script = scratch / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    run("debugfs", "-w", "-f", str(script), str(image))


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` with its contents (lost+found is mkfs's, not ours)."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith("lost+found"):
            found[rel] = path.read_bytes()
    return found


def make_layers(mounted: Mounted, tmp_path: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """layer1: mkfs.ext4 and debugfs on an active snapshot's file, committed; layer2: a child
    written through a loop mount (files added, one of layer1's removed), committed."""
    need("mkfs.ext4", "debugfs", "e2fsck", "mount", "umount")
    store = mounted.store
    store.prepare("build/layer1", size=SIZE)
    image = mounted.path("build/layer1")
    run("mkfs.ext4", "-q", "-F", "-b", "4096", str(image))
    layer1 = {
        "etc/hostname": b"cowstore\n",
        "bin/tool": os.urandom(300_000),
        "doomed": b"removed in layer 2\n",
    }
    debugfs_write(image, layer1, tmp_path)
    store.commit("layer1", "build/layer1")
    run("e2fsck", "-fn", str(mounted.path("layer1")))

    before = sha256(mounted.path("layer1"))
    store.prepare("build/layer2 sha256:ab", "layer1")
    big = os.urandom(3 * MiB)
    with loop_mounted(mounted.path("build/layer2 sha256:ab"), tmp_path / "rw") as rw:
        (rw / "doomed").unlink()
        (rw / "etc" / "motd").write_bytes(b"hello from layer 2\n")
        (rw / "big").write_bytes(big)
    layer2 = {k: v for k, v in layer1.items() if k != "doomed"}
    layer2["etc/motd"] = b"hello from layer 2\n"
    layer2["big"] = big
    store.commit("layer2", "build/layer2 sha256:ab")
    assert sha256(mounted.path("layer1")) == before, "a child's writes changed its parent's bytes"
    run("e2fsck", "-fn", str(mounted.path("layer2")))
    return layer1, layer2


def test_ext4_layers_made_through_files_show_exactly_their_files_in_views(mounted, tmp_path):
    layer1, layer2 = make_layers(mounted, tmp_path)
    mounted.store.view("v1", "layer1")
    mounted.store.view("v2", "layer2")
    with loop_mounted(mounted.path("v1"), tmp_path / "v1", "ro", "noload") as v1:
        assert tree(v1) == layer1
    with loop_mounted(mounted.path("v2"), tmp_path / "v2", "ro", "noload") as v2:
        seen = tree(v2)
        assert seen == layer2
        assert "doomed" not in seen


def test_file_equals_export_and_qemu_img_reading_of_an_equivalent_qcow2_chain(mounted, tmp_path):
    need("qemu-img")
    make_layers(mounted, tmp_path)
    raws = {}
    for key in ("layer1", "layer2"):
        raws[key] = tmp_path / f"{key}.raw"
        with mounted.store.reader(key) as vol:
            export_volume(vol, raws[key], CHUNK)
        assert filecmp.cmp(mounted.path(key), raws[key], shallow=False), f"{key}: file != export"
    base, top, flat = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "flat.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raws["layer1"]), str(base))
    run(
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-B",
        str(base),
        "-F",
        "qcow2",
        str(raws["layer2"]),
        str(top),
    )
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(flat))
    assert filecmp.cmp(mounted.path("layer2"), flat, shallow=False)
    assert (
        run(
            "qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(mounted.path("layer2")), str(top)
        ).returncode
        == 0
    )


def test_fstrim_through_a_loop_device_gives_chunks_back(mounted, tmp_path):
    need("mkfs.ext4", "mount", "umount", "fstrim")
    store = mounted.store
    store.prepare("trimmed", size=SIZE)
    image = mounted.path("trimmed")
    run("mkfs.ext4", "-q", "-F", str(image))
    with loop_mounted(image, tmp_path / "fs") as fs:
        (fs / "data").write_bytes(os.urandom(24 * MiB))
        os.sync()
        full = store.usage("trimmed").size
        (fs / "data").unlink()
        os.sync()
        run("fstrim", str(fs))
    trimmed = store.usage("trimmed").size
    assert full >= 24 * MiB
    assert trimmed <= full - 20 * MiB, f"usage {full} -> {trimmed}: the discards did not reach the pool"
