"""OCI image archives built offline, with umoci and busybox-static, for `ctr images import`.

Two kinds of image, both tarred OCI layouts (`tar -C layout -cf img.tar .`) whose index names
one full reference, so `ctr images import img.tar` imports it under `Image.ref`:

- `small_image`: four layers made the way image builders make them (umoci unpacks the image,
  the rootfs is changed, umoci repacks the difference): busybox and a few files; files added;
  a file and a directory deleted (whiteouts); a file rewritten and another one's mode changed.
- `bench_image`: a parametrised image for benchmarks (`BENCH_200M`, `BENCH_2G`): layers of
  many small files and a few large ones of pseudo-random data (incompressible, so sizes are
  real), written straight into layer tarballs and appended with `umoci raw add-layer`.

Every image records the file tree expected after each of its layers (`Image.layers`) and its
layers' diff IDs, from which `Image.chain_ids` gives the names containerd commits them under.
Built archives are cached (under `default_cache()` unless told otherwise) by a digest of
their parameters and of the busybox binary, so repeated runs reuse them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "cat", "cp", "dd", "echo", "false", "find", "grep", "head", "ls", "mkdir", "rm", "sha256sum",
    "sleep", "stat", "sync", "test", "true", "wc", "xargs",
)  # fmt: skip
TOOLS = ("umoci", "tar")
MOUNTPOINTS = ("dev", "proc", "run", "sys")
"""Empty directories a runtime mounts over, as base images ship them (runc makes any that are
missing, in the container's own layer)."""
FORMAT = 3
"""Bumped when the images change, so cached archives of an older recipe are not reused."""
MTIME = 1_700_000_000
TAG = "latest"


@dataclass(frozen=True)
class Entry:
    """One path of an image's tree: what a container must see there."""

    kind: str
    mode: int
    size: int = 0
    sha256: str = ""
    target: str = ""


Tree = dict[str, Entry]
"""Paths relative to the root (`bin/sh`), without the root itself."""


@dataclass
class Image:
    """An image archive and what it holds."""

    ref: str
    archive: Path
    layers: list[Tree]
    diff_ids: list[str]
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def tree(self) -> Tree:
        """The tree a container of this image starts from (after the last layer)."""
        return self.layers[-1]

    @property
    def size(self) -> int:
        """Bytes of regular files a container sees."""
        return sum(e.size for e in self.tree.values() if e.kind == "file")

    def chain_ids(self) -> list[str]:
        """containerd's snapshot name of each layer: chainID(n) = sha256(chainID(n-1) + " " + diffID(n))."""
        out = [self.diff_ids[0]]
        for diff in self.diff_ids[1:]:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
        return out

    def added(self, n: int) -> set[str]:
        before = self.layers[n - 1] if n else {}
        return set(self.layers[n]) - set(before)

    def removed(self, n: int) -> set[str]:
        before = self.layers[n - 1] if n else {}
        return set(before) - set(self.layers[n])

    def changed(self, n: int) -> set[str]:
        if not n:
            return set()
        before, after = self.layers[n - 1], self.layers[n]
        return {p for p in set(before) & set(after) if before[p] != after[p]}

    def to_json(self) -> str:
        doc = asdict(self)
        doc["archive"] = self.archive.name
        return json.dumps(doc, indent=0, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, directory: Path) -> Image:
        doc = json.loads(text)
        layers = [{p: Entry(**e) for p, e in tree.items()} for tree in doc["layers"]]
        return cls(doc["ref"], directory / doc["archive"], layers, doc["diff_ids"], doc.get("notes", {}))


def missing_tools() -> list[str]:
    """What building images needs and this machine lacks."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not _static(BUSYBOX):
        missing.append(f"{BUSYBOX} (busybox-static)")
    return missing


def _static(path: Path) -> bool:
    """A static ELF has no PT_INTERP program header: it runs in an image without a libc."""
    try:
        data = path.read_bytes()[:65536]
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[32:40], "little")
    size, count = int.from_bytes(data[54:56], "little"), int.from_bytes(data[56:58], "little")
    types = (int.from_bytes(data[phoff + i * size : phoff + i * size + 4], "little") for i in range(count))
    return 3 not in types


def default_cache() -> Path:
    """Where built archives are kept: `$COWSTORE_IMAGE_CACHE`, else /var/tmp/cowstore-images."""
    return Path(os.environ.get("COWSTORE_IMAGE_CACHE", "/var/tmp/cowstore-images"))


def _umoci(*args: str) -> None:
    env = {**os.environ, "GOMAXPROCS": "1"}
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"umoci {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def walk(root: Path) -> Tree:
    """The tree under `root` as a container would see it (for building, and for tests to compare)."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = Entry("symlink", 0o777, target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = Entry("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                tree[rel] = Entry("file", mode, st.st_size, _digest_file(path))
            else:
                tree[rel] = Entry("other", mode)
    return tree


def _finish(layout: Path, ref: str, out: Path) -> list[str]:
    """Name the manifest `ref` in the index, tar the layout to `out`; returns the diff IDs."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (manifest_desc,) = index["manifests"]
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    index_path.write_text(json.dumps(index))
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_desc["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    for blob in blobs.iterdir():
        blob.chmod(0o644)
    subprocess.run(["tar", "-C", str(layout), "-cf", str(out), "."], check=True, timeout=1800)
    return list(config["rootfs"]["diff_ids"])


@contextlib.contextmanager
def _building(cache: Path, key: str) -> Iterator[tuple[Path, Path | None]]:
    """(directory to build in, None), or (the cached directory, itself) when already built."""
    final = cache / key
    if (final / "image.json").exists():
        yield final, final
        return
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        yield work, None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, final: Path, image: Image) -> Image:
    """Move the archive and its description to `final` in the cache (atomically); the cached image."""
    done = work / "done"
    done.mkdir()
    os.replace(image.archive, done / image.archive.name)
    (done / "image.json").write_text(image.to_json())
    try:
        os.rename(done, final)
    except OSError:
        if not (final / "image.json").exists():
            raise
    return Image.from_json((final / "image.json").read_text(), final)


def _key(name: str, params: dict[str, object]) -> str:
    text = json.dumps({"format": FORMAT, "busybox": _digest_file(BUSYBOX), **params}, sort_keys=True)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


# -- the small image ------------------------------------------------------------


SMALL_REF = "cowstore.test/small:latest"


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def _small_layers(rootfs: Path) -> Iterator[str]:
    """Change `rootfs` one layer at a time; yields each layer's history comment after its change."""
    rng = random.Random(13)
    (rootfs / "bin").mkdir(mode=0o755)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    _write(rootfs / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(rootfs / "etc/group", "root:x:0:\n")
    (rootfs / "root").mkdir(mode=0o700)
    (rootfs / "tmp").mkdir(mode=0o1777)
    (rootfs / "tmp").chmod(0o1777)
    for mountpoint in MOUNTPOINTS:
        (rootfs / mountpoint).mkdir(mode=0o755)
    _write(rootfs / "data/base.txt", "from the base layer\n")
    _write(rootfs / "data/doomed.txt", "deleted by layer 3\n")
    _write(rootfs / "data/doomed-dir/one.txt", "deleted with its directory by layer 3\n")
    _write(rootfs / "data/doomed-dir/sub/two.bin", rng.randbytes(3000))
    _write(rootfs / "data/changed.txt", "the base layer's version\n")
    _write(rootfs / "data/chmod.sh", "#!/bin/sh\necho hi\n", 0o644)
    yield "base: busybox, /etc, data files"
    _write(rootfs / "data/added.txt", "added by layer 2\n")
    _write(rootfs / "data/added-dir/nested/random.bin", rng.randbytes(100 * KiB))
    _write(rootfs / "data/base-copy.txt", (rootfs / "data/base.txt").read_bytes())
    yield "adds files"
    (rootfs / "data/doomed.txt").unlink()
    shutil.rmtree(rootfs / "data/doomed-dir")
    yield "deletes a file and a directory (whiteouts)"
    _write(rootfs / "data/changed.txt", "layer 4 rewrote this file, longer than before\n")
    (rootfs / "data/chmod.sh").chmod(0o755)
    (rootfs / "data/link").symlink_to("added.txt")
    yield "rewrites a file, changes a mode, adds a symlink"


def small_image(cache: Path | None = None) -> Image:
    """The four-layer test image (built once into `cache`, default `default_cache()`, then reused)."""
    cache = cache or default_cache()
    key = _key("small", {"ref": SMALL_REF, "applets": APPLETS})
    with _building(cache, key) as (work, cached):
        if cached is not None:
            return Image.from_json((cached / "image.json").read_text(), cached)
        layout, bundle = work / "layout", work / "bundle"
        image = f"{layout}:{TAG}"
        _umoci("init", "--layout", str(layout))
        _umoci("new", "--image", image)
        _umoci("config", "--image", image, "--config.env", "PATH=/bin", "--config.cmd", "/bin/sh")
        _umoci("unpack", "--image", image, str(bundle))
        rootfs = bundle / "rootfs"
        trees = []
        for comment in _small_layers(rootfs):
            _umoci("repack", "--refresh-bundle", "--history.comment", comment, "--image", image, str(bundle))
            trees.append(walk(rootfs))
        diff_ids = _finish(layout, SMALL_REF, work / "img.tar")
        notes = {
            "deleted": "data/doomed.txt data/doomed-dir",
            "changed": "data/changed.txt data/chmod.sh",
        }
        return _publish(work, cache / key, Image(SMALL_REF, work / "img.tar", trees, diff_ids, notes))


# -- benchmark images -----------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """A benchmark image: `total` bytes over `layers` layers; in each layer `small_share` of its
    bytes go to small files of `small_min`..`small_max` bytes and the rest to `large` files."""

    name: str
    total: int
    layers: int = 5
    small_share: float = 0.2
    small_min: int = 1 * KiB
    small_max: int = 32 * KiB
    large: int = 1
    seed: int = 1

    @property
    def ref(self) -> str:
        return f"cowstore.test/{self.name}:latest"


BENCH_200M = BenchSpec("bench-200m", 200 * MiB)
BENCH_2G = BenchSpec("bench-2g", 2 * GiB, large=3)
BENCH_QUICK = BenchSpec("bench-quick", 40 * MiB, small_max=16 * KiB)


class _Noise:
    """Pseudo-random bytes, fast (numpy when present), from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np_rng: Any = None
        try:
            import numpy as np

            self.np_rng = np.random.default_rng(seed)
        except ImportError:
            pass

    def bytes(self, n: int) -> bytes:
        return self.np_rng.bytes(n) if self.np_rng is not None else self.rng.randbytes(n)


def _add(
    tar: tarfile.TarFile,
    tree: Tree,
    path: str,
    data: bytes | None = None,
    *,
    mode: int = 0o644,
    target: str = "",
) -> None:
    """A directory (no data, no target), a symlink (`target`) or a small file (`data`)."""
    info = tarfile.TarInfo(path)
    info.mtime = MTIME
    info.uname = info.gname = "root"
    if target:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        tree[path] = Entry("symlink", 0o777, target=target)
    elif data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tree[path] = Entry("dir", 0o755)
    else:
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))
        tree[path] = Entry("file", info.mode, len(data), hashlib.sha256(data).hexdigest())
        return
    tar.addfile(info)


def _add_large(tar: tarfile.TarFile, tree: Tree, path: str, size: int, noise: _Noise) -> None:
    """A large file streamed into the tarball piece by piece, never whole in memory."""
    info = tarfile.TarInfo(path)
    info.mtime, info.mode, info.size = MTIME, 0o644, size
    info.uname = info.gname = "root"
    digest = hashlib.sha256()

    class Stream(io.RawIOBase):
        left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            n = min(len(buf), self.left, 8 * MiB)
            piece = noise.bytes(n)
            digest.update(piece)
            buf[:n] = piece
            self.left -= n
            return n

    tar.addfile(info, io.BufferedReader(Stream(), 8 * MiB))
    tree[path] = Entry("file", 0o644, size, digest.hexdigest())


def _dirs(tar: tarfile.TarFile, tree: Tree, path: str) -> None:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in tree:
            _add(tar, tree, d)


def bench_large_file(spec: BenchSpec, layer: int = 0, index: int = 0) -> str:
    """Path (in the container, without the leading /) of a large file of `spec`'s image."""
    return f"data/layer{layer}/large-{index}.bin"


def _bench_layer(spec: BenchSpec, n: int, tar: tarfile.TarFile, tree: Tree, noise: _Noise) -> None:
    budget = spec.total // spec.layers
    if n == 0:
        _add(tar, tree, "bin")
        data = BUSYBOX.read_bytes()
        _add(tar, tree, "bin/busybox", data, mode=0o755)
        budget -= len(data)
        for applet in APPLETS:
            _add(tar, tree, f"bin/{applet}", target="busybox")
        _add(tar, tree, "etc")
        _add(tar, tree, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, tree, "etc/group", b"root:x:0:\n")
        _add(tar, tree, "tmp")
        for mountpoint in MOUNTPOINTS:
            _add(tar, tree, mountpoint)
    small_bytes = int(budget * spec.small_share)
    rng = random.Random(spec.seed * 1000 + n)
    written, i = 0, 0
    while written < small_bytes:
        size = min(rng.randint(spec.small_min, spec.small_max), small_bytes - written)
        path = f"data/layer{n}/small/{i // 256:03d}/{i % 256:03d}.bin"
        _dirs(tar, tree, path)
        _add(tar, tree, path, noise.bytes(size))
        written += size
        i += 1
    large_left = budget - written
    for j in range(spec.large):
        size = large_left // (spec.large - j)
        path = bench_large_file(spec, n, j)
        _dirs(tar, tree, path)
        _add_large(tar, tree, path, size, noise)
        large_left -= size


def bench_image(spec: BenchSpec = BENCH_200M, cache: Path | None = None) -> Image:
    """The benchmark image of `spec` (built once into `cache`, default `default_cache()`, then reused)."""
    cache = cache or default_cache()
    key = _key(spec.name, {**asdict(spec), "applets": APPLETS})
    with _building(cache, key) as (work, cached):
        if cached is not None:
            return Image.from_json((cached / "image.json").read_text(), cached)
        layout = work / "layout"
        image = f"{layout}:{TAG}"
        _umoci("init", "--layout", str(layout))
        _umoci("new", "--image", image)
        _umoci("config", "--image", image, "--config.env", "PATH=/bin", "--config.cmd", "/bin/sh")
        noise = _Noise(spec.seed)
        trees: list[Tree] = []
        tree: Tree = {}
        for n in range(spec.layers):
            tree = dict(tree)
            layer_tar = work / f"layer{n}.tar"
            with tarfile.open(layer_tar, "w", format=tarfile.PAX_FORMAT) as tar:
                _bench_layer(spec, n, tar, tree, noise)
            _umoci("raw", "add-layer", "--history.comment", f"layer {n}", "--image", image, str(layer_tar))
            layer_tar.unlink()
            trees.append(tree)
        diff_ids = _finish(layout, spec.ref, work / "img.tar")
        shutil.rmtree(layout)
        notes = {"large": " ".join(p for p, e in tree.items() if e.kind == "file" and e.size >= MiB)}
        return _publish(work, cache / key, Image(spec.ref, work / "img.tar", trees, diff_ids, notes))
