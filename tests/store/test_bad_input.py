"""Bad arguments and damaged files: each ends in correct data or a clear `cowstore.Error`."""

from __future__ import annotations

import contextlib
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cowstore
from cowstore import errors
from tests.conftest import CHUNK, SIZE

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.just("\0"),
    st.just(""),
)

CALLS = {
    "prepare": lambda s, a, b, c: s.prepare(a, b, labels=c),
    "prepare_size": lambda s, a, b, c: s.prepare("fresh", size=a),
    "view": lambda s, a, b, c: s.view(a, b, labels=c),
    "commit": lambda s, a, b, c: s.commit(a, b, labels=c),
    "remove": lambda s, a, b, c: s.remove(a),
    "stat": lambda s, a, b, c: s.stat(a),
    "usage": lambda s, a, b, c: s.usage(a),
    "mounts": lambda s, a, b, c: s.mounts(a),
    "update": lambda s, a, b, c: s.update(a, b),
    "walk": lambda s, a, b, c: list(s.walk(a)),
    "map": lambda s, a, b, c: s.map("active", a, b),
    "pread": lambda s, a, b, c: s.mounts("active").pread(a, b),
    "preadinto": lambda s, a, b, c: s.mounts("active").preadinto(a, b),
    "pwrite": lambda s, a, b, c: s.mounts("active").pwrite(a, b),
    "discard": lambda s, a, b, c: s.mounts("active").discard(a, b),
    "write_zeroes": lambda s, a, b, c: s.mounts("active").write_zeroes(a, b),
    "block_status": lambda s, a, b, c: s.mounts("active").block_status(a, b),
    "view_write": lambda s, a, b, c: s.mounts("view").pwrite(b"x", a),
}


@pytest.fixture(scope="module")
def shared_store():
    s = cowstore.memory(chunk_size=CHUNK, default_size=SIZE)
    s.prepare("base").pwrite(b"base data", 0)
    s.commit("committed", "base")
    s.view("view", "committed")
    s.prepare("active", "committed")
    yield s
    s.close()


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=st.sampled_from(sorted(CALLS)), a=junk, b=junk, c=junk)
def test_random_bad_arguments_raise_only_cowstore_errors(shared_store, call, a, b, c):
    try:
        CALLS[call](shared_store, a, b, c)
    except errors.Error as exc:
        assert str(exc)
    for key in [
        k for k in ("fresh", a, b) if isinstance(k, str) and k not in ("base", "committed", "view", "active")
    ]:
        with contextlib.suppress(errors.Error):
            shared_store.remove(key)
    assert shared_store.view("probe", "committed").pread(9, 0) == b"base data"
    shared_store.remove("probe")
    assert shared_store.mounts("view").pread(9, 0) == b"base data"


def _build(path):
    with cowstore.open(path, create=True, chunk_size=CHUNK, default_size=SIZE) as s:
        rng = random.Random(7)
        a = s.prepare("a")
        a.pwrite(rng.randbytes(20 * CHUNK), 3)
        s.commit("img", "a", labels={"k": "v"})
        c = s.prepare("ctr", "img")
        c.pwrite(rng.randbytes(5 * CHUNK), 7 * CHUNK + 1)
        s.view("v", "img")
        expected = {k: s.mounts(k).pread(SIZE, 0) for k in ("ctr", "v")}
    return expected


def _exercise(path, expected):
    """Open, read and check a damaged store; returns what happened, raising anything unexpected."""
    try:
        with cowstore.open(path) as s:
            for key, data in expected.items():
                if key in {i.name for i in s.walk()}:
                    got = s.mounts(key).pread(SIZE, 0)
                    if got != data:
                        return "wrong-data"
            report = s.check(data=True)
            return "clean" if report.ok else "reported"
    except errors.Error:
        return "error"


@pytest.mark.parametrize("target", ["meta.sqlite", "data"])
def test_flipped_bytes_in_a_closed_store_never_escape_as_other_errors(tmp_path, target):
    pristine = tmp_path / "pristine"
    expected = _build(pristine)
    rng = random.Random(target)
    outcomes = {}
    for i in range(40):
        damaged = tmp_path / f"d{i}"
        shutil.copytree(pristine, damaged)
        name = damaged / target
        blob = bytearray(name.read_bytes())
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(blob))
            blob[pos] ^= 1 << rng.randrange(8)
        name.write_bytes(bytes(blob))
        outcome = _exercise(damaged, expected)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(damaged)
    assert sum(outcomes.values()) == 40
    if target == "meta.sqlite":
        assert "wrong-data" not in outcomes, outcomes


@pytest.mark.parametrize("target", ["meta.sqlite", "data"])
def test_truncated_or_foreign_files_raise_clear_errors(tmp_path, target):
    path = tmp_path / "s"
    expected = _build(path)
    os.truncate(path / target, 100)
    assert _exercise(path, expected) in ("error", "reported")
    (path / target).write_bytes(os.urandom(3 * CHUNK))
    assert _exercise(path, expected) in ("error", "reported")


def test_a_size_whose_map_would_not_fit_is_refused_and_the_store_goes_on(store):
    too_big = CHUNK * 1024 * (1 << 22) + 1
    with pytest.raises(errors.InvalidArgument, match="out of range"):
        store.prepare("huge", size=too_big)
    store.prepare("fine", size=too_big - 1).pwrite(b"x", too_big - 2)
    store.flush()
    assert store.mounts("fine").pread(1, too_big - 2) == b"x"
