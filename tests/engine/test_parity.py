"""The two engines, `cowstore.engines.python` (the reference) and `cowstore.engines._cengine` (Cython),
have one interface and one behaviour: same reads, same errors, same durable bytes."""

from __future__ import annotations

import array
import errno
import gc
import inspect
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowstore.engines import format as fmt
from cowstore.engines import python as _pyengine
from cowstore.engines.format import PARTIAL
from cowstore.errors import Closed, Corruption, NoSpace
from tests.conftest import ENGINE_PARAMS
from tests.data import pattern

try:
    from cowstore.engines import _cengine
except ImportError:  # pragma: no cover - only without a build
    if os.environ.get("COWSTORE_REQUIRE_EXTENSION"):
        raise
    _cengine = None

CS = 4096  # chunk size
PE = 4  # page entries: a page every 4 chunks, so writes cross pages

ENGINES: dict[str, type] = {"python": _pyengine.Engine}
if _cengine is not None:
    ENGINES["cython"] = _cengine.Engine

needs_c = pytest.mark.skipif(_cengine is None, reason="the Cython extension is not built")


@pytest.fixture
def data_fd():
    fd = os.memfd_create("cowstore-test-data")
    yield fd
    os.close(fd)


@pytest.fixture
def file_fd(tmp_path):
    """A data file on disk, where a memfd will not do (a mapping of a real file)."""
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@pytest.fixture
def engine(engine_class, data_fd):
    return engine_class(data_fd, CS, PE)


def page_blob(slots, sums=None) -> bytes:
    """A stored page: little-endian uint32 slots, then as many uint32 chunk sums."""
    return array.array("I", slots).tobytes() + array.array("I", sums or [0] * len(slots)).tobytes()


def dump(engine, map_ids) -> dict[int, bytes]:
    """Every byte of every map."""
    return {i: engine.pread(i, len_of(engine, i), 0) for i in map_ids}


def len_of(engine, map_id: int) -> int:
    return len(engine.map_directory(map_id)) // 8 * engine.page_entries * engine.chunk_size


# -- the durable side, as the store keeps it -------------------------------------------


@dataclass
class Db:
    """What a store makes durable from `take_changes`: pages, map directories, pool size."""

    pages: dict[int, bytes] = field(default_factory=dict)
    maps: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    nslots: int = 0

    def commit(self, engine, nchunks: dict[int, int]) -> None:
        changes = engine.take_changes()
        assert isinstance(changes, _pyengine.Changes)
        for page_id, blob in changes.pages:
            self.pages[page_id] = blob
        for page_id in changes.dead_pages:
            self.pages.pop(page_id, None)
        for map_id, directory in changes.maps:
            self.maps[map_id] = (nchunks[map_id], directory)
        self.nslots = engine.stats()["slots"]
        engine.release(changes.freed)

    def load(self, engine_class: type, fd: int):
        engine = engine_class(fd, CS, PE)
        for page_id, blob in self.pages.items():
            engine.load_page(page_id, blob)
        for map_id, (nchunks, directory) in self.maps.items():
            engine.load_map(map_id, nchunks, directory)
        engine.finish_load(self.nslots)
        return engine


# -- the public interface ----------------------------------------------------------------


def public_api(module) -> set[str]:
    """Names a module defines for its users (not modules, helpers or imported types)."""
    names = set()
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if inspect.ismodule(value) or type(value).__name__ == "_Feature":
            continue
        origin = getattr(value, "__module__", None) if inspect.isclass(value) or callable(value) else None
        if origin is None or origin in {_pyengine.__name__, module.__name__, "cowstore.engines.format"}:
            names.add(name)
    return names


@needs_c
def test_both_modules_export_the_same_public_names():
    assert (
        public_api(_pyengine)
        == public_api(_cengine)
        == {
            "Changes",
            "Engine",
            "MAX_IO",
            "MAX_SLOT",
            "PARTIAL",
            "SUB_BLOCKS",
            "VolumeBase",
            "chunk_sum",
        }
    )
    # Everything else the reference module has is there only because it imports it.
    public = {n for n in dir(_pyengine) if not n.startswith("_")}
    assert {n for n in dir(_cengine) if not n.startswith("_")} <= public


@needs_c
def test_the_c_code_is_compiled_with_the_values_of_format_py():
    """The one enum of ext/core/format.pxi, as the compiled code sees it, against format.py."""
    assert _cengine._format_constants() == {
        "PARTIAL": fmt.PARTIAL,
        "MAX_SLOT": fmt.MAX_SLOT,
        "SUB_BLOCKS": fmt.SUB_BLOCKS,
        "FULL_BITS": fmt.FULL_BITS,
        "page_size(1)": fmt.page_size(1),
        "directory item": len(fmt.encode_directory([0])),
    }


def test_sealed_sums_are_format_chunk_sums(engine):
    data = pattern(3 * CS, 5)
    engine.create_map(1, 3)
    engine.write(1, data, 0)
    engine.write(1, bytes(CS), 2 * CS)  # zeros: no slot, so no sum
    assert engine.seal(1) == 2
    (page,) = engine.take_changes().pages
    entries, sums = fmt.decode_page(page[1], PE)
    assert list(sums) == [fmt.chunk_sum(data[:CS]), fmt.chunk_sum(data[CS : 2 * CS]), 0, 0]
    assert entries[2] == 0


@needs_c
def test_a_call_back_into_the_engine_under_its_lock_fails_instead_of_deadlocking(data_fd):
    """take_changes builds Python objects under the lock: a finalizer (here a GC callback)
    that calls the engine on the same thread gets RuntimeError; another thread waits."""
    engine = _cengine.Engine(data_fd, CS, PE)
    for map_id in range(1, 40):
        engine.create_map(map_id, 2 * PE)
        engine.write(map_id, b"x", 0)
    seen: list[BaseException | None] = []

    def call_back(phase: str, info: dict) -> None:
        if phase == "start":
            try:
                engine.stats()
            except RuntimeError as exc:
                seen.append(exc)

    threshold = gc.get_threshold()
    gc.callbacks.append(call_back)
    gc.set_threshold(1)
    try:
        changes = engine.take_changes()
    finally:
        gc.callbacks.remove(call_back)
        gc.set_threshold(*threshold)
    assert len(changes.maps) == 39
    assert seen, "no collection ran inside take_changes"
    assert "re-entered" in str(seen[0])
    assert engine.stats()["maps"] == 39


@needs_c
def test_both_engines_have_the_same_methods_and_parameters():
    def api(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    hooks = {"Engine": set(), "VolumeBase": {"_attach", "_check_range", "_reclaim"}}
    for cls, private in hooks.items():
        py_cls, c_cls = getattr(_pyengine, cls), getattr(_cengine, cls)
        assert api(py_cls) == api(c_cls), cls
        for name in sorted(api(py_cls) | private):
            py, c = getattr(py_cls, name), getattr(c_cls, name)
            if isinstance(py, property):
                continue
            assert list(inspect.signature(py).parameters) == list(inspect.signature(c).parameters), name


def test_properties_and_pread_type(engine):
    assert engine.chunk_size == CS
    assert engine.page_entries == PE
    engine.create_map(1, 3)
    assert type(engine.pread(1, 10, 5)) is bytes
    assert engine.pread(1, 0, 0) == b""


# -- random operation sequences: both engines and a model ---------------------------------


class EnginesAgree(RuleBasedStateMachine):
    """Random create/clone/drop/write/zero/read on both engines and on a bytearray per map;
    checkpoints compare `take_changes` and reload both engines from the durable state."""

    def __init__(self) -> None:
        super().__init__()
        self.fds = {name: os.memfd_create(f"cowstore-{name}") for name in ENGINES}
        self.engines = {name: cls(self.fds[name], CS, PE) for name, cls in ENGINES.items()}
        self.dbs = {name: Db() for name in ENGINES}
        self.model: dict[int, bytearray] = {}
        self.parent: dict[int, int] = {}
        self.next_id = 1

    def teardown(self) -> None:
        self.engines.clear()
        for fd in self.fds.values():
            os.close(fd)

    def each(self, method: str, *args):
        results = [getattr(e, method)(*args) for e in self.engines.values()]
        assert all(r == results[0] for r in results), (method, args, results)
        return results[0]

    def nchunks(self) -> dict[int, int]:
        return {i: len(b) // CS for i, b in self.model.items()}

    def pick_range(self, data, map_id: int, aligned: bool) -> tuple[int, int]:
        size = len(self.model[map_id])
        if aligned:
            first = data.draw(st.integers(0, size // CS))
            count = data.draw(st.integers(0, size // CS - first))
            return first * CS, count * CS
        offset = data.draw(st.integers(0, size))
        return offset, data.draw(st.integers(0, min(size - offset, 3 * CS)))

    @rule(nchunks=st.integers(0, 11))
    def create(self, nchunks):
        map_id, self.next_id = self.next_id, self.next_id + 1
        self.each("create_map", map_id, nchunks)
        self.model[map_id] = bytearray(nchunks * CS)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def clone(self, data):
        source = data.draw(st.sampled_from(sorted(self.model)))
        map_id, self.next_id = self.next_id, self.next_id + 1
        self.each("clone_map", map_id, source)
        self.model[map_id] = bytearray(self.model[source])
        self.parent[map_id] = source

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def drop(self, data):
        map_id = data.draw(st.sampled_from(sorted(self.model)))
        self.each("drop_map", map_id)
        del self.model[map_id]
        for db in self.dbs.values():
            db.maps.pop(map_id, None)  # the store deletes the snapshot row at once

    @precondition(lambda self: self.model)
    @rule(
        data=st.data(),
        aligned=st.booleans(),
        kind=st.sampled_from(["random", "zeros", "sparse"]),
        seed=st.integers(0, 2**32),
        buffer=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    )
    def write(self, data, aligned, kind, seed, buffer):
        map_id = data.draw(st.sampled_from(sorted(self.model)))
        offset, n = self.pick_range(data, map_id, aligned)
        if kind == "random":
            payload = pattern(n, seed)
        elif kind == "zeros":
            payload = bytes(n)
        else:
            payload = bytearray(n)
            if n:
                payload[seed % n] = 1 + seed % 255
            payload = bytes(payload)
        wrapped = {"bytes": payload, "bytearray": bytearray(payload), "memoryview": memoryview(payload)}[
            buffer
        ]
        self.each("write", map_id, wrapped, offset)
        self.model[map_id][offset : offset + n] = payload

    @precondition(lambda self: self.model)
    @rule(data=st.data(), more=st.integers(0, 6))
    def grow(self, data, more):
        map_id = data.draw(st.sampled_from(sorted(self.model)))
        self.each("grow_map", map_id, len(self.model[map_id]) // CS + more)
        self.model[map_id].extend(bytes(more * CS))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), aligned=st.booleans())
    def zero(self, data, aligned):
        map_id = data.draw(st.sampled_from(sorted(self.model)))
        offset, n = self.pick_range(data, map_id, aligned)
        self.each("zero", map_id, offset, n)
        self.model[map_id][offset : offset + n] = bytes(n)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), aligned=st.booleans())
    def read(self, data, aligned):
        map_id = data.draw(st.sampled_from(sorted(self.model)))
        offset, n = self.pick_range(data, map_id, aligned)
        expected = bytes(self.model[map_id][offset : offset + n])
        assert self.each("pread", map_id, n, offset) == expected
        for e in self.engines.values():
            buf = bytearray(n)
            e.read(map_id, memoryview(buf), offset)
            assert buf == expected

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def introspect(self, data):
        map_id = data.draw(st.sampled_from(sorted(self.model)))
        nchunks = len(self.model[map_id]) // CS
        chain = [map_id]
        while chain[-1] in self.parent and self.parent[chain[-1]] in self.model:
            chain.append(self.parent[chain[-1]])
        others = [i for i in self.model if len(self.model[i]) >= nchunks * CS]
        chain += data.draw(st.lists(st.sampled_from(sorted(others)), max_size=2))
        first = data.draw(st.integers(0, nchunks))
        count = data.draw(st.integers(0, nchunks - first))
        self.each("depth_runs", chain, first, count)
        other = data.draw(st.sampled_from(sorted(self.model)))
        self.each("diff_runs", map_id, other)
        self.each("diff_runs", other, map_id)
        self.each("exclusive_chunks", map_id, None)
        if len(chain) > 1:
            self.each("exclusive_chunks", map_id, chain[1])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def seal(self, data):
        self.each("seal", data.draw(st.sampled_from(sorted(self.model))))

    @rule(verify=st.booleans())
    def verify_reads(self, verify):
        self.each("set_verify", verify)

    @rule()
    def compact(self):
        self.each("trim_free_tail")
        free = self.each("take_free")
        self.each("release", free)
        assert len({os.fstat(fd).st_size for fd in self.fds.values()}) == 1

    @rule(reload=st.booleans())
    def checkpoint(self, reload):
        changes = self.each("take_changes")
        # Replay the same changes as each engine's own commit would.
        for name, engine in self.engines.items():
            db = self.dbs[name]
            for page_id, blob in changes.pages:
                db.pages[page_id] = blob
            for page_id in changes.dead_pages:
                db.pages.pop(page_id, None)
            for map_id, directory in changes.maps:
                db.maps[map_id] = (len(self.model[map_id]) // CS, directory)
            db.nslots = engine.stats()["slots"]
            engine.release(changes.freed)
        assert sorted(self.dbs["python"].maps) == sorted(self.model)
        if reload:
            before = self.each("stats")
            self.engines = {name: self.dbs[name].load(ENGINES[name], self.fds[name]) for name in ENGINES}
            # The durable state holds exactly the live pages and maps: nothing to report.
            assert self.each("take_changes") == _pyengine.Changes([], [], [], [])
            assert self.each("stats") == before
            for map_id, content in self.model.items():
                assert self.each("pread", map_id, len(content), 0) == content

    @invariant()
    def same_stats(self):
        stats = self.each("stats")
        assert stats["maps"] == len(self.model)
        refs = array.array("I", self.each("refcounts"))
        assert len(refs) == stats["slots"] + 1
        assert sum(1 for r in refs if r) == stats["used"]


EnginesAgree.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
TestEnginesAgreeOnRandomOperations = needs_c(EnginesAgree.TestCase)


# -- durable changes: round trips, across engines ------------------------------------------


def random_history(engine, seed: int, steps: int = 300) -> dict[int, bytearray]:
    """Random writes, zeros, clones and drops; the model of the maps that are left."""
    rnd = random.Random(seed)
    model: dict[int, bytearray] = {}
    for map_id in (1, 2):
        nchunks = rnd.randrange(1, 14)
        engine.create_map(map_id, nchunks)
        model[map_id] = bytearray(nchunks * CS)
    next_id = 3
    for _ in range(steps):
        op = rnd.random()
        map_id = rnd.choice(sorted(model))
        size = len(model[map_id])
        offset = rnd.randrange(size + 1)
        n = rnd.randrange(min(size - offset, 2 * CS) + 1)
        if op < 0.5:
            data = pattern(n, rnd.randrange(1 << 30)) if rnd.random() < 0.8 else bytes(n)
            engine.write(map_id, data, offset)
            model[map_id][offset : offset + n] = data
        elif op < 0.7:
            engine.zero(map_id, offset, n)
            model[map_id][offset : offset + n] = bytes(n)
        elif op < 0.85:
            engine.clone_map(next_id, map_id)
            model[next_id] = bytearray(model[map_id])
            next_id += 1
        elif len(model) > 1:
            engine.drop_map(map_id)
            del model[map_id]
    return model


@pytest.mark.parametrize("writer", ENGINE_PARAMS)
@pytest.mark.parametrize("loader", ENGINE_PARAMS)
@pytest.mark.parametrize("seed", range(4))
def test_changes_written_by_one_engine_load_into_either(writer, loader, seed, file_fd):
    engine = ENGINES[writer](file_fd, CS, PE)
    db = Db()
    model = random_history(engine, seed)
    # Commit twice, with more changes in between, so pages are replaced and deleted.
    db.commit(engine, {i: len(b) // CS for i, b in model.items()})
    for map_id in list(model)[:1]:
        engine.drop_map(map_id)
        del model[map_id]
        db.maps.pop(map_id)
    engine.write(sorted(model)[0], pattern(CS, seed), 0)
    model[sorted(model)[0]][0:CS] = pattern(CS, seed)
    db.commit(engine, {i: len(b) // CS for i, b in model.items()})
    engine.flush_data()

    loaded = db.load(ENGINES[loader], file_fd)
    assert loaded.stats() == engine.stats()
    for map_id, content in model.items():
        assert loaded.pread(map_id, len(content), 0) == content
        assert loaded.map_directory(map_id) == engine.map_directory(map_id)
    assert loaded.take_changes().pages == []
    # The loaded engine goes on where the first one stopped.
    target = sorted(model)[-1]
    loaded.write(target, b"after", 3)
    model[target][3:8] = b"after"
    assert loaded.pread(target, len(model[target]), 0) == model[target]


def test_unreferenced_loaded_pages_are_reported_dead_once(engine):
    engine.load_page(7, bytes(8 * PE))
    engine.load_page(3, page_blob([0] * PE))
    engine.load_map(1, PE, (3).to_bytes(8, "little"))
    engine.finish_load(0)
    assert engine.take_changes() == _pyengine.Changes([], [7], [], [])
    assert engine.take_changes() == _pyengine.Changes([], [], [], [])


def test_a_page_that_dies_while_dirty_is_reported_dead_and_not_dirty(engine):
    engine.create_map(1, 2 * PE)
    engine.write(1, b"x", 0)  # page 1, dirty
    engine.clone_map(2, 1)
    engine.write(2, b"y", 0)  # copies page 1 into page 2
    engine.drop_map(2)
    changes = engine.take_changes()
    assert [p for p, _ in changes.pages] == [1]
    assert changes.dead_pages == [2]
    assert changes.freed == [2]
    assert [m for m, _ in changes.maps] == [1]


# -- slots ---------------------------------------------------------------------------------


def test_pending_slots_are_not_reused_before_release(engine):
    engine.create_map(1, 4)
    engine.write(1, pattern(CS, 1), 0)
    engine.write(1, bytes(CS), 0)  # whole chunk of zeros: slot 1 freed, pending
    assert engine.stats() == {"slots": 1, "used": 0, "free": 0, "pending": 1, "maps": 1}
    engine.write(1, pattern(CS, 2), CS)
    assert engine.stats()["slots"] == 2  # a new slot, not the pending one
    changes = engine.take_changes()
    assert changes.freed == [1]
    engine.write(1, pattern(CS, 3), 2 * CS)
    assert engine.stats()["slots"] == 3  # taken but not released: still not reusable
    engine.release(changes.freed)
    assert engine.stats() == {"slots": 3, "used": 2, "free": 1, "pending": 0, "maps": 1}
    engine.write(1, pattern(CS, 4), 3 * CS)
    assert engine.stats() == {"slots": 3, "used": 3, "free": 0, "pending": 0, "maps": 1}
    assert engine.pread(1, 4 * CS, 0) == bytes(CS) + pattern(CS, 2) + pattern(CS, 3) + pattern(CS, 4)


def test_zero_writes_allocate_no_slot(engine):
    engine.create_map(1, 3)
    engine.write(1, bytes(CS), 0)  # whole chunk of zeros
    engine.write(1, bytes(100), CS + 7)  # zeros into an unallocated chunk
    engine.write(1, bytearray(3 * CS), 0)
    engine.zero(1, 5, 2 * CS)
    assert engine.stats() == {"slots": 0, "used": 0, "free": 0, "pending": 0, "maps": 1}
    engine.write(1, b"\1", CS - 1)
    engine.write(1, bytes(100), 0)  # zeros into an allocated chunk: written, not freed
    assert engine.stats()["used"] == 1
    engine.zero(1, 0, CS)
    assert engine.stats() == {"slots": 1, "used": 0, "free": 0, "pending": 1, "maps": 1}
    assert engine.pread(1, 3 * CS, 0) == bytes(3 * CS)


def test_writes_counts_every_write_of_data_and_nothing_else(engine):
    engine.create_map(1, 2)
    engine.write(1, bytes(CS), 0)  # zeros into an unallocated chunk: nothing written
    assert engine.writes == 0
    engine.write(1, pattern(CS, 1), 0)
    after_first = engine.writes
    assert after_first > 0
    engine.take_changes()
    engine.write(1, b"abc", 10)  # in place: no map change, but data to sync
    assert engine.take_changes().pages == []
    assert engine.writes > after_first
    before = engine.writes
    engine.pread(1, 2 * CS, 0)
    engine.clone_map(2, 1)
    engine.zero(2, 0, CS)
    assert engine.writes == before


def test_rewriting_sub_blocks_a_partial_chunk_holds_changes_no_page(engine):
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.clone_map(2, 1, child=True)
    engine.write(2, b"abc", 10)  # copy-up of one sub-block: a partial chunk
    first = engine.take_changes()
    assert first.pages
    engine.write(2, b"xyz", 20)  # the same sub-block: its bytes change, the page does not
    assert engine.take_changes().pages == []
    engine.write(2, b"!", CS // 2)  # a new sub-block: the page changes
    assert engine.take_changes().pages
    expected = bytearray(pattern(CS, 1))
    expected[10:13], expected[20:23], expected[CS // 2] = b"abc", b"xyz", ord("!")
    assert engine.pread(2, CS, 0) == expected


def test_exclusive_chunk_is_written_in_place_and_shared_chunk_is_copied(engine):
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.write(1, b"abc", 10)  # exclusive: in place, no new slot
    assert engine.stats()["slots"] == 2
    engine.clone_map(2, 1)
    engine.write(2, b"xyz", 10)  # shared: copy-on-write of the chunk, not of its neighbour
    assert engine.stats() == {"slots": 3, "used": 3, "free": 0, "pending": 0, "maps": 2}
    expected = bytearray(pattern(2 * CS, 1))
    expected[10:13] = b"abc"
    assert engine.pread(1, 2 * CS, 0) == expected
    expected[10:13] = b"xyz"
    assert engine.pread(2, 2 * CS, 0) == expected
    assert engine.exclusive_chunks(2, 1) == 1
    assert engine.diff_runs(1, 2) == [(0, 1)]
    assert engine.depth_runs([2, 1], 0, 2) == [(1, 1, True), (1, 2, True)]


def test_no_space_raises_and_leaves_the_engine_unchanged(engine):
    engine.create_map(1, 2 * PE)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.set_max_slots(2)
    before = (engine.stats(), engine.pread(1, 2 * PE * CS, 0))
    with pytest.raises(NoSpace) as excinfo:
        engine.write(1, b"x", 2 * CS)
    assert isinstance(excinfo.value, OSError)
    assert excinfo.value.errno == errno.ENOSPC
    engine.clone_map(2, 1)
    with pytest.raises(NoSpace):
        engine.write(2, b"y", 5)  # copy-on-write needs a slot too
    with pytest.raises(NoSpace):
        engine.zero(2, 5, 10)
    assert engine.pread(2, 2 * PE * CS, 0) == before[1]
    engine.drop_map(2)
    assert (engine.stats(), engine.pread(1, 2 * PE * CS, 0)) == before
    engine.write(1, b"in place", 100)  # needs no new slot
    engine.set_max_slots(3)
    engine.write(1, b"x", 2 * CS)


@pytest.mark.parametrize("name", ENGINE_PARAMS)
def test_no_space_in_a_multi_chunk_write_changes_nothing(name, data_fd):
    engine = ENGINES[name](data_fd, CS, PE)
    engine.create_map(1, 4)
    engine.set_max_slots(1)
    with pytest.raises(NoSpace):
        engine.write(1, pattern(2 * CS, 1), 0)
    assert engine.pread(1, 4 * CS, 0) == bytes(4 * CS)
    assert engine.stats()["used"] == 0


def test_finish_load_derives_refcounts_and_free_slots(engine_class, data_fd):
    os.pwrite(data_fd, pattern(5 * CS, 5), 0)
    engine = engine_class(data_fd, CS, PE)
    engine.load_page(1, page_blob([1, 3, 0, 3]))
    engine.load_map(5, 3, (1).to_bytes(8, "little"))
    engine.load_map(6, 4, (1).to_bytes(8, "little"))
    engine.finish_load(5)
    assert engine.stats() == {"slots": 5, "used": 2, "free": 3, "pending": 0, "maps": 2}
    engine.create_map(7, 1)
    engine.write(7, b"a", 0)
    engine.write(7, b"b", CS // 2)
    # The lowest free slot, partial: it holds the two sub-blocks written and nothing else.
    assert engine.take_changes().pages[0][1] == page_blob([2 | PARTIAL, 0, 0, 0], [1 | 1 << 16, 0, 0, 0])
    engine.write(6, b"c", 3 * CS)  # page 1 is shared by maps 5 and 6: copied
    assert engine.pread(6, CS, 3 * CS) == b"c" + pattern(5 * CS, 5)[2 * CS + 1 : 3 * CS]
    assert engine.map_directory(5) == (1).to_bytes(8, "little")
    assert engine.map_directory(6) == (3).to_bytes(8, "little")  # page 2 is map 7's


# -- chunk sums -------------------------------------------------------------------------------


def test_sealed_chunks_are_verified_on_read(engine_class, data_fd):
    engine = engine_class(data_fd, CS, PE)
    engine.create_map(1, 3)
    payload = pattern(2 * CS, 7)
    engine.write(1, payload, 0)
    assert engine.seal(1) == 2
    assert engine.seal(1) == 0
    sums = [_pyengine.chunk_sum(payload[:CS]), _pyengine.chunk_sum(payload[CS:])]
    ((page_id, blob),) = engine.take_changes().pages
    assert blob == page_blob([1, 2, 0, 0], [*sums, 0, 0])
    engine.set_verify(True)
    assert engine.pread(1, 3 * CS, 0) == payload + bytes(CS)
    unaligned = memoryview(bytearray(2 * CS + 1))[1:]
    engine.read(1, unaligned, 0)
    assert unaligned == payload
    os.pwrite(data_fd, b"!", CS + 5)  # slot 2 damaged underneath the engine
    with pytest.raises(Corruption, match="fails its checksum"):
        engine.pread(1, 10, CS + 100)
    with pytest.raises(Corruption, match="fails its checksum"):
        engine.pread(1, 2 * CS, 0)
    assert engine.pread(1, CS, 0) == payload[:CS]
    engine.set_verify(False)
    assert engine.pread(1, 1, CS + 5) == b"!"
    engine.write(1, b"fix", CS + 50)  # a summed chunk is never changed in place: it is copied
    engine.set_verify(True)
    copied = bytearray(payload[CS:])
    copied[5:6], copied[50:53] = b"!", b"fix"
    assert engine.pread(1, CS, CS) == copied
    changes = engine.take_changes()
    assert changes.pages == [(page_id, page_blob([1, 3, 0, 0], [sums[0], 0, 0, 0]))]
    assert changes.freed == [2]  # reusable once the page naming slot 3 is durable
    engine.release(changes.freed)
    engine.clone_map(2, 1)
    engine.write(2, b"new", 0)  # copy-on-write: the new chunk has no sum, the old one keeps its own
    assert engine.take_changes().pages[0][1] == page_blob([2, 3, 0, 0], [0, 0, 0, 0])
    assert engine.seal(2) == 2
    assert engine.pread(2, 3, 0) == b"new"


def test_a_truncated_chunk_with_a_sum_is_corruption(engine_class, data_fd):
    engine = engine_class(data_fd, CS, PE)
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.seal(1)
    engine.create_map(2, 1)
    engine.write(2, pattern(CS, 2), 0)  # slot 3, not sealed
    engine.set_verify(True)
    os.ftruncate(data_fd, CS + 1)
    with pytest.raises(Corruption, match="short read"):
        engine.pread(1, 1, CS)
    with pytest.raises(Corruption, match="short read"):
        engine.seal(2)


# -- compaction ---------------------------------------------------------------------------------


def test_compaction_gives_the_free_tail_back(engine_class, data_fd):
    engine = engine_class(data_fd, CS, PE)
    engine.create_map(1, 6)
    payload = pattern(6 * CS, 1)
    engine.write(1, payload, 0)
    engine.zero(1, 3 * CS, 3 * CS)  # slots 4, 5, 6: pending
    assert engine.trim_free_tail() == 6  # pending slots are not free: nothing to trim
    engine.release(engine.take_changes().freed)
    engine.zero(1, CS, CS)  # slot 2: pending
    assert engine.refcounts() == array.array("I", [0, 1, 0, 1, 0, 0, 0]).tobytes()
    assert engine.trim_free_tail() == 3
    assert os.fstat(data_fd).st_size == 3 * CS
    assert engine.refcounts() == array.array("I", [0, 1, 0, 1]).tobytes()
    assert engine.stats() == {"slots": 3, "used": 2, "free": 0, "pending": 1, "maps": 1}
    assert engine.take_free() == []
    engine.release(engine.take_changes().freed)
    assert engine.take_free() == [2]
    assert engine.stats()["free"] == 0
    engine.release([2])
    engine.write(1, b"x", 5 * CS)  # slot 2
    engine.write(1, b"y", 4 * CS)  # slot 4: the pool grows again
    assert engine.stats() == {"slots": 4, "used": 4, "free": 0, "pending": 0, "maps": 1}
    expected = payload[:CS] + bytes(CS) + payload[2 * CS : 3 * CS] + bytes(CS) + b"y".ljust(CS, b"\0")
    assert engine.pread(1, 6 * CS, 0) == expected + b"x".ljust(CS, b"\0")


# -- bad arguments ---------------------------------------------------------------------------

# (what, call, exception): calls whose name says "load" run before finish_load, the rest after.
BAD_CALLS: list[tuple[str, Callable, type | tuple[type, ...]]] = [
    ("read beyond the end", lambda e: e.pread(1, 2, 4 * CS - 1), ValueError),
    ("negative offset", lambda e: e.pread(1, 1, -1), ValueError),
    ("negative length", lambda e: e.pread(1, -1, 0), ValueError),
    ("huge offset", lambda e: e.pread(1, 1, 2**70), ValueError),
    ("write beyond the end", lambda e: e.write(1, b"ab", 4 * CS - 1), ValueError),
    ("write at a negative offset", lambda e: e.write(1, b"ab", -2), ValueError),
    ("zero beyond the end", lambda e: e.zero(1, 0, 4 * CS + 1), ValueError),
    ("zero a negative length", lambda e: e.zero(1, 5, -1), ValueError),
    ("read into a buffer beyond the end", lambda e: e.read(1, bytearray(4 * CS + 1), 0), ValueError),
    ("create an existing map", lambda e: e.create_map(1, 2), ValueError),
    ("clone onto an existing map", lambda e: e.clone_map(1, 2), ValueError),
    ("depth runs beyond the end", lambda e: e.depth_runs([1], 2, 3), ValueError),
    ("depth runs at a negative chunk", lambda e: e.depth_runs([1], -1, 1), ValueError),
    ("load a page of the wrong size", lambda e: e.load_page(9, bytes(4 * PE)), ValueError),
    ("load page id 0", lambda e: e.load_page(0, bytes(8 * PE)), ValueError),
    ("load a repeated page id", lambda e: e.load_page(50, bytes(8 * PE)), ValueError),
    ("load a directory of the wrong size", lambda e: e.load_map(9, PE + 1, bytes(8)), ValueError),
    ("load a directory not in uint64s", lambda e: e.load_map(9, PE, bytes(7)), ValueError),
    ("load a map twice", lambda e: e.load_map(1, 4, bytes(8)), ValueError),
    (
        "load a directory naming a missing page",
        lambda e: e.load_map(9, PE, (77).to_bytes(8, "little")),
        ValueError,
    ),
    ("finish loading a pool beyond the limit", lambda e: (e.set_max_slots(3), e.finish_load(4)), ValueError),
    ("missing map: read", lambda e: e.pread(404, 1, 0), KeyError),
    ("missing map: read into", lambda e: e.read(404, bytearray(1), 0), KeyError),
    ("missing map: write", lambda e: e.write(404, b"x", 0), KeyError),
    ("missing map: zero", lambda e: e.zero(404, 0, 1), KeyError),
    ("missing map: drop", lambda e: e.drop_map(404), KeyError),
    ("missing map: clone source", lambda e: e.clone_map(3, 404), KeyError),
    ("missing map: directory", lambda e: e.map_directory(404), KeyError),
    ("missing map: depth runs", lambda e: e.depth_runs([1, 404], 0, 1), KeyError),
    ("missing map: diff runs", lambda e: e.diff_runs(1, 404), KeyError),
    ("missing map: exclusive chunks", lambda e: e.exclusive_chunks(404, None), KeyError),
    ("missing map: seal", lambda e: e.seal(404), KeyError),
    ("missing parent: exclusive chunks", lambda e: e.exclusive_chunks(1, 404), KeyError),
    ("write from a non-contiguous buffer", lambda e: e.write(1, memoryview(bytes(8))[::2], 0), TypeError),
    # (the reference raises BufferError from os.preadv, or TypeError for an unallocated chunk)
    ("read into read-only memory", lambda e: e.read(1, b"12", 0), (TypeError, BufferError)),
]


@pytest.mark.parametrize(("what", "call", "exc"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_and_change_nothing(engine, what, call, exc):
    engine.load_page(50, page_blob([1, 0, 2, 0]))
    engine.load_map(1, 4, (50).to_bytes(8, "little"))
    engine.create_map(2, 4)
    if "load" not in what:
        engine.finish_load(2)
    before_changes = engine.stats()
    with pytest.raises(exc) as excinfo:
        call(engine)
    if exc is KeyError:
        assert excinfo.value.args == (404,)
    assert engine.stats() == before_changes
    assert engine.has_map(1) and engine.has_map(2) and not engine.has_map(404) and not engine.has_map(3)
    assert engine.map_directory(1) == (50).to_bytes(8, "little")


def test_bad_engine_parameters(engine_class, data_fd):
    for chunk_size in (0, -4096, 3000):
        with pytest.raises(ValueError):
            engine_class(data_fd, chunk_size, PE)
    with pytest.raises(ValueError):
        engine_class(data_fd, CS, 0)


def test_finish_load_rejects_slots_beyond_the_pool(engine):
    engine.load_page(1, page_blob([0, 9, 0, 0]))
    engine.load_map(1, 4, (1).to_bytes(8, "little"))
    with pytest.raises(ValueError):
        engine.finish_load(8)
    engine.finish_load(9)
    assert engine.stats()["used"] == 1


@pytest.mark.parametrize("name", ENGINE_PARAMS)
def test_a_failed_load_map_leaves_no_page_reference(name, data_fd):
    engine = ENGINES[name](data_fd, CS, PE)
    engine.load_page(1, bytes(8 * PE))
    with pytest.raises(ValueError):
        engine.load_map(1, 2 * PE, (1).to_bytes(8, "little") + (2).to_bytes(8, "little"))
    engine.finish_load(0)
    assert engine.take_changes().dead_pages == [1]


@pytest.mark.parametrize("name", ENGINE_PARAMS)
@pytest.mark.parametrize(
    "slots", [[0], [5], [1], [2], [3, 3], [3, 1]], ids=["zero", "beyond", "in use", "free", "twice", "mixed"]
)
def test_release_rejects_slots_that_are_not_freed(name, slots, data_fd):
    engine = ENGINES[name](data_fd, CS, PE)
    engine.create_map(1, 3)
    engine.write(1, pattern(3 * CS, 1), 0)
    engine.zero(1, CS, CS)
    engine.release(engine.take_changes().freed)  # slot 2 is free
    engine.zero(1, 2 * CS, CS)
    assert engine.take_changes().freed == [3]  # slot 3 is freed, not yet released
    with pytest.raises(ValueError):
        engine.release(slots)
    assert engine.stats() == {"slots": 3, "used": 1, "free": 1, "pending": 0, "maps": 1}
    engine.release([3])
    assert engine.stats() == {"slots": 3, "used": 1, "free": 2, "pending": 0, "maps": 1}


@pytest.mark.parametrize("name", ENGINE_PARAMS)
def test_loading_after_finish_load_is_refused(name, data_fd):
    engine = ENGINES[name](data_fd, CS, PE)
    engine.finish_load(0)
    with pytest.raises(ValueError):
        engine.load_page(1, bytes(8 * PE))
    with pytest.raises(ValueError):
        engine.finish_load(0)


@pytest.mark.parametrize("name", ENGINE_PARAMS)
def test_depth_runs_of_an_empty_chain_is_a_bad_argument(name, data_fd):
    engine = ENGINES[name](data_fd, CS, PE)
    with pytest.raises(ValueError):
        engine.depth_runs([], 0, 0)


@pytest.mark.parametrize("name", ENGINE_PARAMS)
def test_a_negative_map_size_is_a_bad_argument(name, data_fd):
    engine = ENGINES[name](data_fd, CS, PE)
    with pytest.raises(ValueError):
        engine.create_map(1, -8)
    assert not engine.has_map(1)


# -- buffers, files --------------------------------------------------------------------------


def test_any_contiguous_buffer_can_be_read_into_and_written_from(engine):
    np = pytest.importorskip("numpy")
    engine.create_map(1, 4)
    payload = pattern(2 * CS, 3)
    engine.write(1, np.frombuffer(payload, dtype=np.uint8).reshape(2, CS), 0)
    engine.write(1, array.array("I", range(CS // 4)), 2 * CS)
    out = np.zeros((4, CS // 4), dtype=np.uint32)
    engine.read(1, out, 0)
    assert out.tobytes()[: 2 * CS] == payload
    assert out.tobytes()[2 * CS : 3 * CS] == array.array("I", range(CS // 4)).tobytes()
    view = bytearray(100)
    engine.read(1, memoryview(view)[10:60], 5)
    assert view[10:60] == payload[5:55]
    with pytest.raises(TypeError):
        engine.write(1, np.zeros((4, 4), dtype=np.uint8)[:, ::2], 0)
    with pytest.raises(TypeError):
        engine.read(1, np.zeros((4, 4), dtype=np.uint8).T, 0)
    engine.read(1, b"", 0)  # nothing to fill: even read-only memory is fine


def test_a_truncated_data_file_is_corruption(engine_class, file_fd):
    engine = engine_class(file_fd, CS, PE)
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.flush_data()
    # At a page boundary: the Cython engine reads through a mapping, where bytes past the
    # end of the file but inside its last 4 KiB page read as zeros instead of faulting.
    os.ftruncate(file_fd, CS)
    assert engine.pread(1, 10, CS - 10) == pattern(2 * CS, 1)[CS - 10 : CS]
    with pytest.raises(Corruption):
        engine.pread(1, CS, CS)
    engine.clone_map(2, 1)
    with pytest.raises(Corruption):
        engine.write(2, b"partial", CS + 100)  # reading the shared chunk to copy it


def test_io_errors_are_os_errors(engine_class):
    r, w = os.pipe()
    os.close(w)
    try:
        engine = engine_class(r, CS, PE)
        engine.create_map(1, 1)
        with pytest.raises(OSError):
            engine.write(1, b"x", 0)
        assert engine.stats() == {"slots": 1, "used": 0, "free": 1, "pending": 0, "maps": 1}
        with pytest.raises(OSError):
            engine.flush_data()
    finally:
        os.close(r)


def test_a_parent_cannot_change_or_go_while_it_has_children(engine):
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.clone_map(2, 1, child=True)
    for call in (
        lambda: engine.write(1, b"x", 0),
        lambda: engine.zero(1, 0, CS),
        lambda: engine.drop_map(1),
    ):
        with pytest.raises(ValueError):
            call()
    engine.clone_map(3, 2)  # takes map 2's place: its parent is map 1 too
    engine.drop_map(2)
    with pytest.raises(ValueError):
        engine.drop_map(1)
    engine.drop_map(3)
    engine.write(1, b"free again", 0)
    engine.drop_map(1)


def test_a_child_grown_past_its_parent_reads_zeros_there_and_reloads():
    """Both engines: a grown child's new chunks read as zeros, first writes there (partial
    and whole) read nothing from the parent, and the same durable bytes load in either."""
    results = []
    for cls in ENGINES.values():
        fd = os.memfd_create("cowstore-grow")
        e = cls(fd, CS, PE)
        e.create_map(1, 3)  # the last page of map 1 ends inside its span
        e.write(1, pattern(3 * CS, 1), 0)
        e.seal(1)
        e.clone_map(2, 1, child=True)
        e.write(2, b"cow", 5)
        e.grow_map(2, 11)
        e.write(2, b"p", 3 * CS + 7)  # inside the parent's last page, past its end
        e.write(2, b"q" * CS, 9 * CS)  # pages the parent does not have
        e.write(2, b"r", 10 * CS + 1)
        want = bytearray(pattern(3 * CS, 1)) + bytearray(8 * CS)
        want[5:8] = b"cow"
        want[3 * CS + 7] = ord("p")
        want[9 * CS : 10 * CS] = b"q" * CS
        want[10 * CS + 1] = ord("r")
        assert e.pread(2, 11 * CS, 0) == want
        assert e.exclusive_chunks(2, 1) == 4
        runs = [(1, 1, True), (2, 2, True), (1, 1, True), (5, 0, False), (2, 1, True)]
        assert e.depth_runs([2, 1], 0, 11) == runs
        with pytest.raises(ValueError):
            e.grow_map(2, 10)  # chunk 10 is allocated
        with pytest.raises(ValueError):
            e.grow_map(1, 12)  # a parent cannot change
        changes = e.take_changes()
        pages, maps = dict(changes.pages), dict(changes.maps)
        for loader in ENGINES.values():
            again = loader(fd, CS, PE)
            for page_id, blob in sorted(pages.items()):
                again.load_page(page_id, blob)
            again.load_map(1, 3, maps[1])
            again.load_map(2, 11, maps[2], 1)
            again.finish_load(-(-os.fstat(fd).st_size // CS))
            assert again.pread(2, 11 * CS, 0) == want
        results.append(changes)
        bad = cls(fd, CS, PE)
        for page_id, blob in sorted(pages.items()):
            bad.load_page(page_id, blob)
        bad.load_map(1, 3, maps[1], 2)  # a parent larger than its child
        bad.load_map(2, 11, maps[2])
        with pytest.raises(ValueError):
            bad.finish_load(-(-os.fstat(fd).st_size // CS))
        os.close(fd)
    assert all(r == results[0] for r in results)


def test_a_first_small_write_copies_only_the_sub_blocks_it_touches(engine, data_fd):
    sub = CS // 32
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.take_changes()
    engine.clone_map(2, 1, child=True)
    size = os.fstat(data_fd).st_size
    engine.write(2, b"new", CS + 5 * sub + 10)  # slot 3, only sub-block 5 written
    assert os.fstat(data_fd).st_size == 2 * CS + 6 * sub
    entries = array.array("I", engine.take_changes().pages[0][1])
    assert (entries[1], entries[PE + 1]) == (3 | PARTIAL, 1 << 5)
    want = bytearray(pattern(2 * CS, 1))
    want[CS + 5 * sub + 10 : CS + 5 * sub + 13] = b"new"
    assert engine.pread(2, 2 * CS, 0) == want
    # Writes into the partial chunk fill it; once every sub-block is there it is whole.
    engine.write(2, b"edge", CS + 7 * sub - 2)  # half in sub-block 6, half in 7
    want[CS + 7 * sub - 2 : CS + 7 * sub + 2] = b"edge"
    assert engine.pread(2, 2 * CS, 0) == want
    engine.write(2, bytes(want[CS : 2 * CS]), CS)
    entries = array.array("I", engine.take_changes().pages[0][1])
    assert (entries[1], entries[PE + 1]) == (3, 0)
    assert size < os.fstat(data_fd).st_size == 3 * CS
    assert engine.pread(2, 2 * CS, 0) == want


def test_seal_fills_partial_chunks_and_sums_them(engine):
    engine.create_map(1, 3)
    engine.write(1, pattern(3 * CS, 1), 0)
    engine.seal(1)
    engine.clone_map(2, 1, child=True)
    engine.write(2, b"one", 10)
    engine.write(2, b"two", 2 * CS + 100)
    want = engine.pread(2, 3 * CS, 0)
    assert engine.seal(2) == 2
    changes = engine.take_changes()
    page = dict(changes.pages)[max(dict(changes.pages))]
    entries, sums = array.array("I", page[: 4 * PE]), array.array("I", page[4 * PE :])
    assert not any(e & PARTIAL for e in entries)
    engine.clone_map(3, 2)
    engine.drop_map(2)
    engine.set_verify(True)
    assert engine.pread(3, 3 * CS, 0) == want
    assert all(sums[i] for i in range(3))


def test_a_closed_engine_refuses_io_and_keeps_its_bytes(engine_class, file_fd):
    engine = engine_class(file_fd, CS, PE)
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * CS, 1), 0)
    engine.close()
    engine.close()
    for call in (
        lambda: engine.write(1, b"late", 10),
        lambda: engine.zero(1, 0, CS),
        lambda: engine.pread(1, 4, 0),
        lambda: engine.read(1, bytearray(4), 0),
        lambda: engine.seal(1),
    ):
        with pytest.raises(Closed):
            call()
    assert os.pread(file_fd, 2 * CS, 0) == pattern(2 * CS, 1)


@needs_c
def test_an_overwrite_of_a_fresh_slot_that_faults_is_done_again_by_pwrite_not_a_crash(file_fd):
    """A copy into the mapping that faults (here a file truncated behind the engine's back;
    on a full disk, a hole the file system cannot fill) is not a crash: the write is done
    again by pwrite, which reports the file system's own error, or here extends the file."""
    engine = _cengine.Engine(file_fd, CS, PE)
    engine.create_map(1, 8)
    engine.write(1, pattern(8 * CS, 1), 0)
    engine.write(1, b"in place", 3 * CS + 5)
    assert os.pread(file_fd, 8, 3 * CS + 5) == b"in place"  # through the mapping, same file
    os.ftruncate(file_fd, 0)
    engine.write(1, b"faults", 6 * CS + 7)
    assert os.fstat(file_fd).st_size == 6 * CS + 7 + 6
    assert os.pread(file_fd, 6, 6 * CS + 7) == b"faults"


@needs_c
def test_an_overwrite_of_a_slot_handed_over_by_take_changes_is_a_pwrite(file_fd):
    """Once the changes naming a slot are handed over, a kill must not tear a write to it
    inside a page: the write goes by pwrite, which (unlike a copy into the mapping) does
    not fault on a file truncated behind the engine's back, but extends it."""
    engine = _cengine.Engine(file_fd, CS, PE)
    engine.create_map(1, 8)
    engine.write(1, pattern(8 * CS, 1), 0)
    engine.take_changes()
    os.ftruncate(file_fd, 0)
    engine.write(1, b"by pwrite", 6 * CS + 7)
    assert os.fstat(file_fd).st_size == 6 * CS + 7 + 9
    assert os.pread(file_fd, 9, 6 * CS + 7) == b"by pwrite"
    engine.create_map(2, 1)  # a slot allocated after take_changes is fresh again
    engine.write(2, pattern(CS, 2), 0)
    engine.write(2, b"mapped", 9)
    assert os.pread(file_fd, 6, 8 * CS + 9) == b"mapped"


def test_writes_that_bring_a_fresh_partial_chunk_sub_blocks_keep_the_parents_bytes_between(
    engine_class, file_fd
):
    """Random 4 KiB writes into a child land mostly in chunks an earlier write made partial,
    bringing them sub-blocks they lack (the Cython engine does those covering whole
    sub-blocks on its fast path, with the GIL held). The parent keeps supplying the rest, a
    write with edges brings the parent's bytes around it, and the chunk is whole once every
    sub-block is written."""
    cs = 64 * 1024
    engine = engine_class(file_fd, cs, PE)
    engine.create_map(1, 2)
    engine.write(1, pattern(2 * cs, 1), 0)
    engine.seal(1)
    engine.clone_map(2, 1, child=True)
    model = bytearray(pattern(2 * cs, 1))

    def write(data: bytes, off: int) -> None:
        engine.write(2, data, off)
        model[off : off + len(data)] = data
        assert engine.pread(2, 2 * cs, 0) == model

    write(b"\x11" * 4096, 8192)  # allocates: a partial chunk
    write(b"\x66" * 4096, 2 * cs - 4096)  # and another, so the file holds the first whole
    write(b"\x22" * 4096, 16384)  # new sub-blocks, covered whole
    write(b"\x33" * 2048, 30720)  # one new sub-block
    write(b"\x44" * 100, 40000)  # new sub-block with edges from the parent
    write(b"\x55" * 4096, 8192)  # sub-blocks the chunk has
    entries = array.array("I", engine.take_changes().pages[-1][1])
    assert entries[0] & PARTIAL
    for off in range(0, cs, 4096):
        write(bytes([off // 4096 + 1]) * 4096, off)
    entries = array.array("I", engine.take_changes().pages[-1][1])
    assert entries[0] and not entries[0] & PARTIAL
    assert engine.pread(1, 2 * cs, 0) == pattern(2 * cs, 1)


def test_preallocation_reserves_past_the_end_within_the_pool_limit(engine_class, file_fd):
    engine = engine_class(file_fd, CS, PE)
    with pytest.raises(ValueError):
        engine.set_preallocate(-1)
    engine.set_preallocate(1 << 30)
    engine.set_max_slots(100)
    engine.create_map(1, 8)
    engine.write(1, pattern(CS, 1), 0)
    st = os.fstat(file_fd)
    if st.st_blocks * 512 <= CS:
        pytest.skip("the file system cannot reserve blocks")
    assert st.st_size == CS
    assert 100 * CS <= st.st_blocks * 512 <= 101 * CS  # 1 MiB wanted, cut to the pool limit
    engine.write(1, pattern(2 * CS, 2), CS)
    assert os.fstat(file_fd).st_blocks * 512 == st.st_blocks * 512  # inside the reservation
    assert engine.trim_free_tail() == 3
    assert os.fstat(file_fd).st_blocks * 512 <= 3 * CS
    assert engine.pread(1, CS, 0) == pattern(CS, 1)


# -- introspection -------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("seed", range(6))
def test_depth_and_diff_runs_agree_on_random_chains(seed):
    rnd = random.Random(seed)
    engines = {}
    fds = []
    for name, cls in ENGINES.items():
        fds.append(os.memfd_create(name))
        engines[name] = cls(fds[-1], CS, PE)
    try:
        nchunks = rnd.randrange(1, 30)
        ops = []
        ops.append(("create_map", 1, nchunks))
        for depth in range(2, 7):
            ops.append(("clone_map", depth, depth - 1))
            for _ in range(rnd.randrange(0, 10)):
                chunk = rnd.randrange(nchunks)
                if rnd.random() < 0.25:
                    ops.append(("zero", depth - 1 if rnd.random() < 0.2 else depth, chunk * CS, CS))
                else:
                    ops.append(("write", depth, pattern(rnd.randrange(1, 100), chunk), chunk * CS))
        for op, *args in ops:
            for e in engines.values():
                getattr(e, op)(*args)
        results = []
        for e in engines.values():
            chain = [6, 5, 4, 3, 2, 1]
            results.append(
                (
                    e.depth_runs(chain, 0, nchunks),
                    e.depth_runs(chain[2:], nchunks // 2, nchunks - nchunks // 2),
                    [e.diff_runs(a, b) for a in range(1, 7) for b in range(1, 7)],
                    [e.exclusive_chunks(a, a - 1 if a > 1 else None) for a in range(1, 7)],
                )
            )
        assert results[0] == results[1]
        runs = results[0][0]
        assert sum(n for n, _, _ in runs) == nchunks
    finally:
        for fd in fds:
            os.close(fd)


def test_depth_runs_names_the_layer_that_supplies_each_chunk(engine):
    engine.create_map(1, 8)
    engine.write(1, b"a", 0)
    engine.write(1, b"b", 5 * CS)
    engine.clone_map(2, 1)
    engine.write(2, b"c", 1 * CS)
    engine.write(2, b"d", 5 * CS)
    engine.clone_map(3, 2)
    engine.zero(3, 0, CS)
    assert engine.depth_runs([3, 2, 1], 0, 8) == [
        (1, 1, False),  # zeroed in 3: 3 differs from 2
        (1, 2, True),  # written in 2
        (3, 0, False),
        (1, 2, True),  # rewritten in 2
        (2, 0, False),
    ]
    assert engine.depth_runs([1], 0, 8) == [(1, 1, True), (4, 0, False), (1, 1, True), (2, 0, False)]
    assert engine.diff_runs(1, 3) == [(0, 2), (5, 1)]
    assert engine.exclusive_chunks(3, 2) == 0
    assert engine.exclusive_chunks(2, 1) == 2
    assert engine.exclusive_chunks(2, None) == 3


# -- threads ---------------------------------------------------------------------------------


def test_threads_on_different_maps_end_consistent(engine_class, data_fd):
    engine = engine_class(data_fd, CS, PE)
    nchunks = 24
    base = pattern(nchunks * CS, 99)
    engine.create_map(1, nchunks)
    engine.write(1, base, 0)
    models = {}
    for map_id in range(2, 6):
        engine.clone_map(map_id, 1)  # pages shared with the base: every first write copies
        models[map_id] = bytearray(base)
    errors: list[BaseException] = []
    db = Db()
    db_lock = threading.Lock()
    done = threading.Event()

    def worker(map_id: int) -> None:
        rnd = random.Random(map_id)
        model = models[map_id]
        try:
            for _ in range(300):
                offset = rnd.randrange(len(model))
                n = rnd.randrange(min(len(model) - offset, 3 * CS) + 1)
                op = rnd.random()
                if op < 0.45:
                    data = pattern(n, rnd.randrange(1 << 30))
                    engine.write(map_id, data, offset)
                    model[offset : offset + n] = data
                elif op < 0.55:
                    engine.zero(map_id, offset, n)
                    model[offset : offset + n] = bytes(n)
                else:
                    assert engine.pread(map_id, n, offset) == model[offset : offset + n]
        except BaseException as exc:
            errors.append(exc)

    def base_reader() -> None:
        rnd = random.Random(0)
        try:
            while not done.is_set():
                offset = rnd.randrange(len(base))
                n = rnd.randrange(min(len(base) - offset, 4 * CS) + 1)
                assert engine.pread(1, n, offset) == base[offset : offset + n]
        except BaseException as exc:
            errors.append(exc)

    def committer() -> None:
        try:
            while not done.is_set():
                with db_lock:
                    db.commit(engine, {i: nchunks for i in range(1, 6)})
                engine.stats()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in models]
    extra = [threading.Thread(target=base_reader), threading.Thread(target=committer)]
    for t in threads + extra:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in extra:
        t.join()
    assert not errors, errors
    for map_id, model in models.items():
        assert engine.pread(map_id, len(model), 0) == model
    assert engine.pread(1, len(base), 0) == base
    db.commit(engine, {i: nchunks for i in range(1, 6)})
    loaded = db.load(engine_class, data_fd)
    assert loaded.stats() == engine.stats()
    for map_id, model in [*models.items(), (1, bytearray(base))]:
        assert loaded.pread(map_id, len(model), 0) == model


def test_a_data_file_truncated_while_open_is_corruption_not_a_crash(engine_class, file_fd):
    engine = engine_class(file_fd, CS, PE)
    engine.create_map(1, 64)
    engine.write(1, pattern(64 * CS, 3), 0)
    assert engine.pread(1, 64 * CS, 0) == pattern(64 * CS, 3)
    os.ftruncate(file_fd, 0)
    with pytest.raises(Corruption):
        engine.pread(1, 32 * CS, 16 * CS)
    with pytest.raises(Corruption):
        engine.read(1, bytearray(CS), 40 * CS)
