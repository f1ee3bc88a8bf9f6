"""`make demo`: the container story through containerd, when this machine can run it.

An OCI image built offline (umoci + busybox, four layers, one deleting a file of an earlier
one) is imported by a private containerd onto cowstore (`cowstore serve --containerd`);
two containers run from it and write in their own layers; the layer table then shows
what each snapshot holds alone and what it shares with the layers below; the image's
layers are unchanged by the containers; removing the image and the containers leaves the
store empty. Where containerd cannot run here (not root, a tool missing), the in-process
demo (`cowstore.demo`) runs instead, saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cowstore import demo as inprocess
from cowstore.fuse import file_name
from cowstore.units import format_size
from tests.containerd import daemon, images, plugin

NAMESPACE = "demo"
CONTAINERS = {"web": 8, "db": 24}
"""Container name -> MiB it writes into its own layer."""


def why_not() -> str | None:
    """Why the containerd demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "containerd, runc and loop devices need root"
    missing = [*daemon.missing_tools(), *images.missing_tools()]
    missing += [t for t in ("fusermount3", "mkfs.ext4", "debugfs") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(sorted(set(missing)))} (`bash .ci/install-tools` installs them)"
    try:
        import grpc  # noqa: F401
    except ImportError:
        return "grpcio is not installed (pip install 'cowstore[containerd]')"
    return None


def cowstore_cli(store: Path, *args: str) -> str:
    """A `cowstore` command on the store the plugin holds: it runs in the plugin's daemon."""
    proc = subprocess.run(
        [*plugin.command(), "--store", str(store), *args], capture_output=True, text=True, env=plugin.env()
    )
    if proc.returncode:
        raise RuntimeError(f"cowstore {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def layer_table(store: Path) -> list[tuple[str, ...]]:
    """Per snapshot: kind, the bytes it holds alone, the bytes it reads from layers below."""
    rows = [("SNAPSHOT", "KIND", "SIZE", "EXCLUSIVE", "SHARED")]
    for info in json.loads(cowstore_cli(store, "ls", "--json")):
        key = info["name"]
        exclusive = json.loads(cowstore_cli(store, "usage", "--json", key))["size"]
        allocated = sum(
            e["length"] for e in json.loads(cowstore_cli(store, "map", "--json", key)) if e["data"]
        )
        short = key if len(key) < 60 else key[:28] + "…" + key[-28:]
        rows.append(
            (
                short,
                info["kind"],
                format_size(info["size"]),
                format_size(exclusive),
                format_size(allocated - exclusive),
            )
        )
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def layer_digests(files: Path, chain_ids: list[str], keys: list[str]) -> dict[str, str]:
    """sha256 of each committed layer's file (its whole ext4), by chain id."""
    out = {}
    for chain_id in chain_ids:
        key = next(k for k in keys if k.endswith("/" + chain_id) or k == chain_id)
        h = hashlib.sha256()
        with open(files / file_name(key), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        out[chain_id] = h.hexdigest()
    return out


def through_containerd(work: Path) -> int:
    started = time.perf_counter()
    print("A four-layer OCI image built offline (umoci + busybox-static; cached)…")
    image = images.small_image()
    (work / "plugin").mkdir()
    (work / "containerd").mkdir()
    store, sock = work / "plugin" / "store", work / "plugin" / "snapshots.sock"
    # Small snapshots, so that hashing every layer's whole file takes seconds, not minutes.
    cowstore_cli(store, "init", "--default-size", "512M")
    with (
        plugin.serving(store, sock),
        daemon.Containerd(work / "containerd", {plugin.NAME: sock}, NAMESPACE) as ctrd,
    ):
        print(
            f"containerd {ctrd.ctr('version').stdout.split()[2]} "
            f"with cowstore as its snapshotter `{plugin.NAME}`"
        )
        t = time.perf_counter()
        ctrd.ctr("images", "import", "--snapshotter", plugin.NAME, str(image.archive))
        print(f"imported {image.ref} ({len(image.chain_ids())} layers) in {time.perf_counter() - t:.2f} s")
        keys = [i["name"] for i in json.loads(cowstore_cli(store, "ls", "--json"))]
        before = layer_digests(store / "files", image.chain_ids(), keys)

        for name, mib in CONTAINERS.items():
            ctrd.start_detached(image.ref, name, "/bin/sleep", "600", snapshotter=plugin.NAME)
            script = (
                f"cat /data/*.txt >/dev/null && dd if=/dev/urandom of=/{name}.bin bs=1M count={mib} && sync"
            )
            ctrd.exec(name, f"{name}-write", "/bin/sh", "-c", script)
            seen = ctrd.exec(
                name, f"{name}-look", "/bin/sh", "-c", "ls /*.bin; test ! -e /data/doomed.txt && echo ok"
            )
            print(
                f"container {name}: wrote {mib} MiB into its own layer; sees {' '.join(seen.stdout.split())}"
            )

        print(
            "\nThe store's snapshots (containerd's keys; `cowstore` commands run in the plugin's daemon):\n"
        )
        print_table(layer_table(store))
        print("\nEXCLUSIVE: bytes only this snapshot holds (copied up on write);")
        print("SHARED: bytes it reads from the layers below without a copy.")

        ctrd.remove(*CONTAINERS)
        after = layer_digests(store / "files", image.chain_ids(), keys)
        if before != after:
            print("FAILED: a container's write changed an image layer", file=sys.stderr)
            return 1
        print(
            f"\nEvery image layer is byte-identical after the containers' writes "
            f"({len(after)} sha256 checked)."
        )
        ctrd.gc()
        ctrd.collect()
        left = json.loads(cowstore_cli(store, "ls", "--json"))
        kept = json.loads(cowstore_cli(store, "df", "--json"))["disk_bytes"]
        compacted = json.loads(cowstore_cli(store, "compact", "--json"))["disk_bytes"]
        print(
            f"After `ctr images rm` and containerd's GC: {len(left)} snapshots left; the data file "
            f"keeps {format_size(kept)} of free chunks on disk for the next containers, "
            f"{format_size(compacted)} after `cowstore compact`."
        )
    print(f"\n{time.perf_counter() - started:.1f} s in all; no mount, loop device or process left behind.")
    return 0 if not left else 1


def main() -> int:
    reason = why_not()
    if reason is not None:
        print(f"The containerd demo cannot run here: {reason}. The in-process demo instead.\n")
        return inprocess.main()
    with tempfile.TemporaryDirectory(prefix="cowstore-demo-", dir="/var/tmp") as work:
        return through_containerd(Path(work))


if __name__ == "__main__":
    sys.exit(main())
