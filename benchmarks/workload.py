"""The workloads the benchmarks share: one chain of layers built twice, and synthetic big maps.

A chain of `depth` layers over a volume of `Layout.size` bytes: layer 1 (the base) writes
the whole volume, every later layer rewrites a different 1/16 of it (slice `(layer - 2) % 16`),
each layer with its own byte pattern, so every byte of the top says which layer supplied it.
`QcowChain` builds it as qcow2 backing files with qemu-img and qemu-io, `CowChain` as
committed cowstore snapshots through the Python API; `Layout.expected` says what the top
must read, so both can be checked against each other and against the model.
"""

from __future__ import annotations

import os
import subprocess
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cowstore
from cowstore import layout, metadata
from cowstore.engines import format
from cowstore.units import KiB, MiB

WRITE_SIZE = 1 * MiB
QEMU_IO_STEP = 64 * MiB
RANDOM_STRIDE = 4 * KiB * 100_003
"""Step of the pseudo-random 4 KiB pattern: an odd number of blocks, so offsets `i * step % size`
visit every block of a power-of-two volume once, far apart; `qemu-img bench -S` can do the same."""


@dataclass(frozen=True)
class Layout:
    """The shape of a chain: volume size, chunk (and qcow2 cluster) size, how many slices."""

    size: int
    chunk: int = 64 * KiB
    slices: int = 16

    def __post_init__(self) -> None:
        if self.size % (self.chunk * self.slices):
            raise ValueError(f"size {self.size} must be a multiple of {self.slices} chunks of {self.chunk}")

    def pattern(self, layer: int) -> int:
        """The byte layer `layer` (1-based) writes: never zero, so nothing is elided as zeros."""
        return (layer - 1) % 255 + 1

    def extent(self, layer: int) -> tuple[int, int]:
        """(offset, length) that layer `layer` writes."""
        if layer == 1:
            return 0, self.size
        part = self.size // self.slices
        return (layer - 2) % self.slices * part, part

    def expected(self, depth: int, offset: int) -> int:
        """The byte at `offset` of the top of a chain of `depth` layers."""
        for layer in range(depth, 0, -1):
            start, length = self.extent(layer)
            if start <= offset < start + length:
                return self.pattern(layer)
        return 0


def stride_offsets(size: int, block: int, count: int, step: int = RANDOM_STRIDE) -> list[int]:
    """Offsets of `count` requests of `block` bytes, stepping by `step` modulo `size` (qemu-img bench -S)."""
    offsets, offset = [], 0
    for _ in range(count):
        offsets.append(offset)
        offset = (offset + step) % size
        if offset + block > size:
            offset = 0
    return offsets


def run(command: Sequence[str | os.PathLike[str]], *, timeout: float = 600, **kw) -> str:
    """Run a command to completion; its stdout, or an error that carries its stderr."""
    argv = [os.fspath(c) for c in command]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{argv[0]} is not installed") from exc
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


class QcowChain:
    """The chain as qcow2 files: `layer-1.qcow2` (the base) … `layer-N.qcow2`, each backing the next."""

    def __init__(self, directory: Path, layout: Layout) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.depth = 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, layer: int) -> Path:
        return self.directory / f"layer-{layer}.qcow2"

    def create(self, path: Path, backing: Path | None) -> Path:
        """A new, empty qcow2 image with the layout's cluster size, on `backing` if given."""
        command = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={self.layout.chunk}"]
        if backing is None:
            command += [path, str(self.layout.size)]
        else:
            command += ["-b", backing.absolute(), "-F", "qcow2", path]
        run(command)
        return path

    def extend(self, depth: int) -> None:
        """Add layers until the chain has `depth` of them."""
        for layer in range(self.depth + 1, depth + 1):
            path = self.create(self.path(layer), self.path(layer - 1) if layer > 1 else None)
            offset, length = self.layout.extent(layer)
            writes = []
            for pos in range(offset, offset + length, QEMU_IO_STEP):
                n = min(QEMU_IO_STEP, offset + length - pos)
                writes += ["-c", f"write -q -P {self.layout.pattern(layer)} {pos} {n}"]
            run(["qemu-io", "-f", "qcow2", *writes, path])
            self.depth = layer

    def overlay(self, path: Path, depth: int) -> Path:
        """A fresh, empty top on layer `depth`."""
        return self.create(path, self.path(depth))

    def flatten(self, depth: int, out: Path) -> Path:
        """Layer `depth` with its backing chain, as one raw image (what `nbdkit file` serves)."""
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-S", "0", self.path(depth), out])
        return out


class CowChain:
    """The chain as cowstore snapshots: committed `layer-1` … `layer-N` in one store."""

    def __init__(self, path: Path, layout: Layout, engine: str | None = None) -> None:
        self.path = Path(path)
        self.layout = layout
        self.engine = engine
        self.depth = 0

    @staticmethod
    def key(layer: int) -> str:
        return f"layer-{layer}"

    def open(self) -> cowstore.Store:
        return cowstore.open(self.path, create=True, chunk_size=self.layout.chunk, engine=self.engine)

    def extend(self, depth: int) -> None:
        """Add layers until the chain has `depth` of them (each prepare, write, commit)."""
        with self.open() as store:
            for layer in range(self.depth + 1, depth + 1):
                build = f"build-{layer}"
                if layer == 1:
                    volume = store.prepare(build, size=self.layout.size)
                else:
                    volume = store.prepare(build, self.key(layer - 1))
                offset, length = self.layout.extent(layer)
                fill = bytes([self.layout.pattern(layer)]) * WRITE_SIZE
                for pos in range(offset, offset + length, WRITE_SIZE):
                    n = min(WRITE_SIZE, offset + length - pos)
                    volume.pwrite(memoryview(fill)[:n], pos)
                store.commit(self.key(layer), build)
                self.depth = layer


def verify(layout: Layout, depth: int, reads: dict[str, object], samples: int = 64) -> None:
    """Check that every reader (name -> callable(length, offset) -> bytes) sees the model's bytes.

    Samples the first and last block of every slice plus `samples` spread offsets; raises
    `AssertionError` naming the reader and offset on the first difference.
    """
    block = 4 * KiB
    part = layout.size // layout.slices
    offsets = {0, layout.size - block}
    for s in range(layout.slices):
        offsets |= {s * part, (s + 1) * part - block}
    offsets |= set(stride_offsets(layout.size, block, samples))
    for offset in sorted(offsets):
        want = bytes([layout.expected(depth, offset)]) * block
        for name, read in reads.items():
            got = read(block, offset)
            if got != want:
                raise AssertionError(
                    f"{name} reads {got[:8].hex()} at {offset} of depth {depth}, expected {want[:8].hex()}"
                )


def synth_store(path: Path, mapped: int, *, chunk_size: int = 64 * KiB, key: str = "base") -> str:
    """Make a store whose committed snapshot `key` maps `mapped` chunks, without writing data.

    Writing a million 64 KiB chunks would take 64 GiB; metadata costs (prepare, commit, open,
    memory) do not depend on the bytes, so this writes the map pages straight into the
    metadata (encoded by `cowstore.engines.format`) and makes the data file sparse. The sums
    are those of zero chunks, which is what the sparse file reads, so the store also passes
    `check(data=True)`.
    """
    path = Path(path)
    cowstore.open(path, create=True, chunk_size=chunk_size).close()
    meta = metadata.Metadata(str(path / layout.META_FILE))
    try:
        pe = int(meta.settings(str(path))["page_entries"])
        zero_sum = format.chunk_sum(bytes(chunk_size))
        pages, directory = [], []
        for page_id, first in enumerate(range(0, mapped, pe), start=1):
            n = min(pe, mapped - first)
            entries = array("I", range(first + 1, first + n + 1)) + array("I", bytes(4 * (pe - n)))
            sums = array("I", [zero_sum]) * n + array("I", bytes(4 * (pe - n)))
            pages.append((page_id, format.encode_page(entries, sums)))
            directory.append(page_id)
        now = int(time.time() * 1_000_000)
        row = metadata.Row(
            1, key, "committed", None, {}, now, now, mapped * chunk_size, format.encode_directory(directory)
        )
        with meta.transaction() as db:
            metadata.insert_snapshot(db, row)
            metadata.write_changes(db, pages, [], [])
    finally:
        meta.close()
    os.truncate(path / layout.DATA_FILE, mapped * chunk_size)
    return key
