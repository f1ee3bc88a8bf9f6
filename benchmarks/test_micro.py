"""Micro-benchmarks of the engine through the public API, each against both engines.

Every timed call does a batch of operations (so timer overhead vanishes), and the recorder
reports the time per operation, so the two engines compare even where the pure-Python one
runs fewer rounds. Stores for data paths live in memory (a memfd: page-cache speed,
no disk noise); stores for metadata costs are real directories, on tmpfs (the CPU cost)
and on disk (with the fsyncs a durable `prepare` and `commit` pay). Metadata benchmarks
use parents with up to a million mapped chunks built by `workload.synth_store`, which
writes the map pages without writing 64 GiB of data.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import cowstore
from benchmarks import peers
from benchmarks.workload import synth_store
from cowstore.units import KiB, MiB

CHUNK = 64 * KiB
VOLUME = 64 * MiB
RANDOM_OPS = 4096
COW_OPS = VOLUME // CHUNK
DEPTH_VOLUME = 16 * MiB
DEPTH_CHUNKS_PER_LAYER = 4
DEPTHS = (1, 32, 256, 1024)
ALTERNATING_ROUNDS = 25
MAPPED = {"1k": 1_000, "100k": 100_000, "1M": 1_000_000}
PLACES = [("tmpfs", "1k"), ("tmpfs", "100k"), ("tmpfs", "1M"), ("disk", "1k"), ("disk", "1M")]
SHM = Path("/dev/shm")


def _fill(volume: cowstore.Volume, size: int, byte: int = 0x5A) -> None:
    block = bytes([byte]) * MiB
    for offset in range(0, size, MiB):
        volume.pwrite(block, offset)


@pytest.fixture
def filled(engine: str):
    """An active snapshot of VOLUME bytes, every chunk written since the last flush (so
    every write lands in place, in chunks no durable map names yet)."""
    store = cowstore.memory(chunk_size=CHUNK, engine=engine)
    volume = store.prepare("filled", size=VOLUME)
    _fill(volume, VOLUME)
    yield volume
    store.close()


@pytest.fixture
def flushed(engine: str):
    """`filled`, then flushed: every write lands in place, over chunks a durable map names."""
    store = cowstore.memory(chunk_size=CHUNK, engine=engine)
    volume = store.prepare("flushed", size=VOLUME)
    _fill(volume, VOLUME)
    store.flush()
    yield volume
    store.close()


def _random_offsets(block: int, count: int, size: int = VOLUME) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(size // block) * block for _ in range(count)]


def _reader(volume: cowstore.Volume, block: int, offsets: list[int]):
    buf = bytearray(block)
    read = volume.preadinto

    def run() -> None:
        for offset in offsets:
            read(buf, offset)

    return run


def _writer(volume: cowstore.Volume, block: int, offsets: list[int]):
    data = bytes([0xA5]) * block
    write = volume.pwrite

    def run() -> None:
        for offset in offsets:
            write(data, offset)

    return run


def test_rand_pread_4k(benchmark, record, engine, filled):
    offsets = _random_offsets(4 * KiB, RANDOM_OPS)
    benchmark(_reader(filled, 4 * KiB, offsets))
    record.timing(benchmark, "rand_pread_4k", engine, ops=len(offsets), nbytes=4 * KiB * len(offsets))


def test_cached_pread_4k(benchmark, record, engine, filled):
    """One 4 KiB block read over and over, so it comes from the CPU cache: the engine's own
    cost per call, without the memory traffic that random reads pay in both engines alike."""
    offsets = [8 * CHUNK] * RANDOM_OPS
    benchmark(_reader(filled, 4 * KiB, offsets))
    record.timing(benchmark, "cached_pread_4k", engine, ops=len(offsets), nbytes=4 * KiB * len(offsets))


def test_rand_pwrite_4k(benchmark, record, engine, filled):
    offsets = _random_offsets(4 * KiB, RANDOM_OPS)
    benchmark(_writer(filled, 4 * KiB, offsets))
    record.timing(benchmark, "rand_pwrite_4k", engine, ops=len(offsets), nbytes=4 * KiB * len(offsets))


def test_rand_pwrite_4k_flushed(benchmark, record, engine, flushed):
    """Rewrites of flushed chunks: the Cython engine writes these by pwrite, which a killed
    process leaves applied by whole pages, where it copies into the mapping for chunks
    written since the last flush."""
    offsets = _random_offsets(4 * KiB, RANDOM_OPS)
    benchmark(_writer(flushed, 4 * KiB, offsets))
    nbytes = 4 * KiB * len(offsets)
    record.timing(benchmark, "rand_pwrite_4k_flushed", engine, ops=len(offsets), nbytes=nbytes)


def test_seq_pread_64k(benchmark, record, engine, filled):
    offsets = list(range(0, VOLUME, 64 * KiB))
    benchmark(_reader(filled, 64 * KiB, offsets))
    record.timing(benchmark, "seq_pread_64k", engine, ops=len(offsets), nbytes=VOLUME)


def test_seq_pwrite_64k(benchmark, record, engine, filled):
    offsets = list(range(0, VOLUME, 64 * KiB))
    benchmark(_writer(filled, 64 * KiB, offsets))
    record.timing(benchmark, "seq_pwrite_64k", engine, ops=len(offsets), nbytes=VOLUME)


@pytest.fixture
def parent(engine: str):
    """A store with a committed, fully written snapshot `parent` of VOLUME bytes."""
    store = cowstore.memory(chunk_size=CHUNK, engine=engine)
    _fill(store.prepare("build", size=VOLUME), VOLUME)
    store.commit("parent", "build")
    yield store
    store.close()


@pytest.mark.parametrize("kind", ["cow", "in_place"])
def test_write_4k_first_vs_in_place(benchmark, record, engine, parent, kind):
    """4 KiB at the start of every chunk of a child: the first write to a shared chunk
    (copy on write: allocate, copy 64 KiB, write) against the same writes once it is owned."""
    offsets = list(range(0, VOLUME, CHUNK))
    names = (f"child-{n}" for n in itertools.count())
    owned = parent.prepare("owned", "parent")
    _fill(owned, VOLUME, 0x11)

    def setup():
        if kind == "in_place":
            return (owned,), {}
        return (parent.prepare(next(names), "parent"),), {}

    def target(volume: cowstore.Volume) -> None:
        _writer(volume, 4 * KiB, offsets)()

    def teardown(volume: cowstore.Volume) -> None:
        if kind == "cow":
            parent.remove(volume.key)

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=10, warmup_rounds=1)
    name = "first_write_cow_4k" if kind == "cow" else "write_in_place_4k"
    record.timing(benchmark, name, engine, ops=len(offsets), nbytes=4 * KiB * len(offsets), group="cow")


_chains: dict[str, cowstore.Store] = {}


@pytest.fixture(scope="module")
def chains():
    """Per engine, one memory store with a chain of max(DEPTHS) layers over DEPTH_VOLUME bytes.

    Layer 1 writes everything; layer n rewrites DEPTH_CHUNKS_PER_LAYER chunks at a rotating place.
    """
    yield _chains
    for store in _chains.values():
        store.close()
    _chains.clear()


def _chain(chains: dict[str, cowstore.Store], engine: str) -> cowstore.Store:
    if engine in chains:
        return chains[engine]
    store = cowstore.memory(chunk_size=CHUNK, engine=engine)
    _fill(store.prepare("build-1", size=DEPTH_VOLUME), DEPTH_VOLUME)
    store.commit("layer-1", "build-1")
    span = DEPTH_CHUNKS_PER_LAYER * CHUNK
    slots = DEPTH_VOLUME // span
    for layer in range(2, max(DEPTHS) + 1):
        volume = store.prepare(f"build-{layer}", f"layer-{layer - 1}")
        volume.pwrite(bytes([layer % 255 + 1]) * span, (layer - 2) % slots * span)
        store.commit(f"layer-{layer}", f"build-{layer}")
    chains[engine] = store
    return store


@pytest.mark.parametrize("depth", DEPTHS)
def test_read_depth(benchmark, record, engine, chains, depth):
    """Sequential 64 KiB reads of a view on layer `depth` of the chain: one lookup per chunk at any depth."""
    store = _chain(chains, engine)
    view = store.view(f"view-{depth}", f"layer-{depth}")
    offsets = list(range(0, DEPTH_VOLUME, 64 * KiB))
    try:
        benchmark(_reader(view, 64 * KiB, offsets))
    finally:
        store.remove(view.key)
    record.timing(
        benchmark, "read_depth", engine, ops=len(offsets), nbytes=DEPTH_VOLUME, params={"depth": depth}
    )


def test_read_depth_alternating(record, engine, chains):
    """The depths of test_read_depth read in turn, round after round, medians reported.

    Run one after another (as pytest-benchmark does), the depths also differ by whatever the
    machine was doing meanwhile; read in turn, a drift hits every depth alike, so their ratio
    is the cost of depth alone. Same reads as test_read_depth.
    """
    store = _chain(chains, engine)
    views = {depth: store.view(f"turn-{depth}", f"layer-{depth}") for depth in DEPTHS}
    offsets = list(range(0, DEPTH_VOLUME, 64 * KiB))
    times: dict[int, list[float]] = {depth: [] for depth in DEPTHS}
    try:
        for _ in range(ALTERNATING_ROUNDS):
            for depth, view in views.items():
                run = _reader(view, 64 * KiB, offsets)
                start = time.perf_counter()
                run()
                times[depth].append(time.perf_counter() - start)
    finally:
        for view in views.values():
            store.remove(view.key)
    depths = {}
    for depth, values in times.items():
        median = statistics.median(values)
        depths[str(depth)] = {
            "median_s": median,
            "bytes_per_s": DEPTH_VOLUME / median,
            "per_op_s": median / len(offsets),
        }
    record.figure("read_depth_alternating", engine, rounds=ALTERNATING_ROUNDS, depths=depths)


_synth: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Where synthetic stores go: {"tmpfs": a directory in /dev/shm, "disk": one in the test tmp dir}."""
    roots = {"disk": tmp_path_factory.mktemp("synth")}
    shm = None
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        shm = tempfile.TemporaryDirectory(prefix="cowstore-bench-", dir=SHM)
        roots["tmpfs"] = Path(shm.name)
    yield roots
    if shm is not None:
        shm.cleanup()


def _synth_store(roots: dict[str, Path], where: str, chunks: str) -> Path:
    if where not in roots:
        pytest.skip(f"no {where} directory here")
    path = _synth.get((where, chunks))
    if path is None or not path.exists():
        path = roots[where] / f"store-{chunks}"
        synth_store(path, MAPPED[chunks], chunk_size=CHUNK)
        _synth[(where, chunks)] = path
    return path


@pytest.mark.parametrize(("where", "chunks"), PLACES)
def test_prepare(benchmark, record, engine, synth_root, where, chunks):
    """`prepare` of an active child of a committed parent with `chunks` mapped chunks (durable on return)."""
    store = cowstore.open(_synth_store(synth_root, where, chunks), engine=engine)
    names = (f"child-{n}" for n in itertools.count())
    try:
        benchmark.pedantic(
            store.prepare,
            setup=lambda: ((next(names), "base"), {}),
            teardown=lambda key, parent: store.remove(key),
            rounds=20,
            warmup_rounds=1,
        )
    finally:
        store.close()
    record.timing(benchmark, "prepare", engine, ops=1, params={"where": where, "chunks": chunks})


def test_prepare_alternating(record, engine, synth_root):
    """`prepare` on parents of 1k, 100k and 1M chunks (tmpfs) in turn, round after round, medians.

    The sizes take turns so that drift in the machine's speed hits them alike: their ratio is
    the cost of the parent's size alone. Same call as test_prepare.
    """
    stores = {
        chunks: cowstore.open(_synth_store(synth_root, "tmpfs", chunks), engine=engine) for chunks in MAPPED
    }
    times: dict[str, list[float]] = {chunks: [] for chunks in MAPPED}
    try:
        for n in range(ALTERNATING_ROUNDS * 2):
            for chunks, store in stores.items():
                start = time.perf_counter()
                store.prepare(f"turn-{n}", "base")
                times[chunks].append(time.perf_counter() - start)
                store.remove(f"turn-{n}")
    finally:
        for store in stores.values():
            store.close()
    sizes = {
        chunks: {"median_s": statistics.median(values), "min_s": min(values)}
        for chunks, values in times.items()
    }
    record.figure("prepare_alternating", engine, rounds=ALTERNATING_ROUNDS * 2, where="tmpfs", sizes=sizes)


@pytest.mark.parametrize(("where", "chunks"), PLACES)
def test_commit(benchmark, record, engine, synth_root, where, chunks):
    """`commit` of an active child (one chunk written) of a parent with `chunks` mapped chunks."""
    store = cowstore.open(_synth_store(synth_root, where, chunks), engine=engine)
    names = (f"child-{n}" for n in itertools.count())

    def setup():
        key = next(names)
        store.prepare(key, "base").pwrite(b"\x01" * 4096, 0)
        return (f"{key}-committed", key), {}

    rounds = 5 if engine == "python" and chunks == "1M" else 15
    try:
        benchmark.pedantic(
            store.commit,
            setup=setup,
            teardown=lambda name, key: store.remove(name),
            rounds=rounds,
            warmup_rounds=1,
        )
    finally:
        store.close()
    record.timing(benchmark, "commit", engine, ops=1, params={"where": where, "chunks": chunks})


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_open_1m(benchmark, record, engine, synth_root, where):
    """Opening a store whose one snapshot maps a million chunks (loads pages, derives refcounts)."""
    path = _synth_store(synth_root, where, "1M")
    opened: list[cowstore.Store] = []

    def teardown() -> None:
        opened.pop().close()

    benchmark.pedantic(
        lambda: opened.append(cowstore.open(path, engine=engine)),
        teardown=teardown,
        rounds=5 if engine == "python" else 10,
        warmup_rounds=1,
    )
    record.timing(benchmark, "open_1m", engine, ops=1, params={"where": where})


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, resource, sys, time
    import cowstore

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    path, engine = sys.argv[1], sys.argv[2]
    warm = cowstore.memory(engine=engine)
    warm.prepare("warm", size=1 << 20).pwrite(b"x", 0)
    warm.close()
    gc.collect()
    before, peak_before = rss(), peak()
    start = time.perf_counter()
    store = cowstore.open(path, engine=engine)
    opened = time.perf_counter() - start
    gc.collect()
    after, peak_after = rss(), peak()
    chunks = store.usage("base").chunks
    store.close()
    print(json.dumps({"chunks": chunks, "rss_delta": after - before,
                      "peak_delta": max(peak_after - before, after - before), "open_s": opened}))
    """
)


def test_memory_per_chunk(record, engine, synth_root):
    """Resident memory an open store holds per mapped chunk: RSS before and after opening a
    store with a million mapped chunks, in a fresh interpreter (tracemalloc cannot see C)."""
    path = _synth_store(synth_root, "disk", "1M")
    env = peers.cowstore_env(engine)
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(path), engine],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    figures["bytes_per_chunk"] = figures["rss_delta"] / figures["chunks"]
    record.figure("memory_per_chunk", engine, **figures)
    print(f"{engine}: {figures['bytes_per_chunk']:.1f} B per mapped chunk ({figures})")
