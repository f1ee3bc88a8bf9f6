"""Long random sequences of snapshotter and volume calls, checked against a tiny reference model.

The model is a bytearray per snapshot; a child starts as a copy of its parent. After every
step each snapshot's bytes must equal the model's, byte for byte.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import cowstore
from cowstore import errors

CHUNK = 4096
SIZE = 6 * CHUNK + 1000
offsets = st.integers(0, SIZE - 1)


class SnapshotterModel(RuleBasedStateMachine):
    engine = "python"
    on_disk = False

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp()) if self.on_disk else None
        self.store = self._open(create=True)
        self.data: dict[str, bytearray] = {}
        self.kind: dict[str, str] = {}
        self.parent: dict[str, str | None] = {}
        self.counter = 0

    def _open(self, create: bool = False) -> cowstore.Store:
        if self.dir is None:
            return cowstore.memory(chunk_size=CHUNK, default_size=SIZE, engine=self.engine)
        return cowstore.open(
            self.dir / "s", create=create, chunk_size=CHUNK, default_size=SIZE, engine=self.engine
        )

    def teardown(self) -> None:
        self.store.close()
        if self.dir is not None:
            shutil.rmtree(self.dir)

    def _key(self) -> str:
        self.counter += 1
        return f"k/{self.counter}"

    def _keys(self, kind: str) -> list[str]:
        return sorted(k for k, v in self.kind.items() if v == kind)

    @rule(parent=st.none() | st.integers(0, 100))
    def prepare(self, parent):
        committed = self._keys("committed")
        name = committed[parent % len(committed)] if parent is not None and committed else None
        key = self._key()
        self.store.prepare(key, name)
        self.data[key] = bytearray(self.data[name]) if name else bytearray(SIZE)
        self.kind[key], self.parent[key] = "active", name

    @precondition(lambda self: self._keys("committed"))
    @rule(pick=st.integers(0, 100))
    def view(self, pick):
        committed = self._keys("committed")
        name = committed[pick % len(committed)]
        key = self._key()
        self.store.view(key, name)
        self.data[key] = bytearray(self.data[name])
        self.kind[key], self.parent[key] = "view", name

    @precondition(lambda self: self._keys("active"))
    @rule(
        pick=st.integers(0, 100),
        offset=offsets,
        data=st.binary(min_size=1, max_size=2 * CHUNK + 10),
        zeros=st.booleans(),
    )
    def pwrite(self, pick, offset, data, zeros):
        key = self._keys("active")[pick % len(self._keys("active"))]
        if zeros:
            data = bytes(len(data))
        data = data[: SIZE - offset]
        self.store.mounts(key).pwrite(data, offset)
        self.data[key][offset : offset + len(data)] = data

    @precondition(lambda self: self._keys("active"))
    @rule(pick=st.integers(0, 100), offset=offsets, length=st.integers(0, 3 * CHUNK), discard=st.booleans())
    def zero(self, pick, offset, length, discard):
        key = self._keys("active")[pick % len(self._keys("active"))]
        length = min(length, SIZE - offset)
        vol = self.store.mounts(key)
        (vol.discard if discard else vol.write_zeroes)(offset, length)
        self.data[key][offset : offset + length] = bytes(length)

    @precondition(lambda self: self._keys("active"))
    @rule(pick=st.integers(0, 100))
    def commit(self, pick):
        key = self._keys("active")[pick % len(self._keys("active"))]
        name = self._key()
        self.store.commit(name, key)
        self.data[name] = self.data.pop(key)
        self.parent[name] = self.parent.pop(key)
        del self.kind[key]
        self.kind[name] = "committed"

    @precondition(lambda self: self.kind)
    @rule(pick=st.integers(0, 100))
    def remove(self, pick):
        key = sorted(self.kind)[pick % len(self.kind)]
        if key in self.parent.values():
            with pytest.raises(errors.FailedPrecondition):
                self.store.remove(key)
            return
        self.store.remove(key)
        for table in (self.data, self.kind, self.parent):
            del table[key]

    @rule()
    def flush(self):
        self.store.flush()

    @precondition(lambda self: self.dir is not None)
    @rule()
    def reopen(self):
        self.store.close()
        self.store = self._open()

    @invariant()
    def every_snapshot_matches_the_model(self):
        for key, kind in self.kind.items():
            if kind == "committed":
                vol = self.store.view("probe", key)
                got = vol.pread(SIZE, 0)
                self.store.remove("probe")
            else:
                got = self.store.mounts(key).pread(SIZE, 0)
            assert got == bytes(self.data[key]), key
        assert {i.name: i.parent for i in self.store.walk()} == self.parent

    @invariant()
    def usage_is_never_more_than_the_written_chunks(self):
        total = sum(self.store.usage(k).chunks for k in self.kind)
        assert total <= self.store._engine.stats()["used"]


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_random_histories_match_the_model(engine: str, on_disk: bool) -> None:
    machine = type(
        f"Model_{engine}_{'disk' if on_disk else 'memory'}",
        (SnapshotterModel,),
        {"engine": engine, "on_disk": on_disk},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
