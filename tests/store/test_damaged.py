"""A damaged store can be diagnosed and salvaged, as thin_check and qemu-img check allow.

`cowstore.open(path, readonly=True)` opens what is intact, changing nothing: intact snapshots
read and export as usual, damaged ones are refused by name, and `check` reports every
problem it can see instead of stopping at the first."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

import cowstore
from cowstore import errors
from tests.conftest import CHUNK

SIZE = 64 * CHUNK


def build(path: Path, engine: str) -> dict[str, bytes]:
    """base (committed) <- child (committed) <- top (active); other (active), alone."""
    data = {}
    with cowstore.open(path, create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine) as s:
        v = s.prepare("b", size=SIZE)
        v.pwrite(os.urandom(20 * CHUNK), 0)
        s.commit("base", "b")
        v = s.prepare("c", "base")
        v.pwrite(os.urandom(3 * CHUNK), 5 * CHUNK)
        s.commit("child", "c")
        s.prepare("top", "child").pwrite(b"top", 0)
        s.prepare("other", size=SIZE).pwrite(os.urandom(40 * CHUNK), 8 * CHUNK)
        for key in ("base", "child", "top", "other"):
            data[key] = s.reader(key).pread(SIZE, 0)
    return data


def digest(path: Path) -> dict[str, str]:
    """The store's own files (not SQLite's -wal and -shm side files)."""
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in ("data", "meta.sqlite")}


def page_of(path: Path, key: str) -> int:
    """A page only `key`'s map names."""
    with sqlite3.connect(path / "meta.sqlite") as db:
        rows = {k: d for k, d in db.execute("SELECT key, directory FROM snapshots")}
    db.close()
    ids = {
        k: {int.from_bytes(d[i : i + 8], "little") for i in range(0, len(d), 8)} - {0}
        for k, d in rows.items()
    }
    others = set().union(*(v for k, v in ids.items() if k != key))
    return min(ids[key] - others - {0})


def damage(path: Path, how: str) -> set[str]:
    """Damage the closed store at `path`; returns the snapshots the damage reaches."""
    if how == "truncated data":
        os.truncate(path / "data", 10 * CHUNK)
        return {"base", "child", "top", "other"}
    with sqlite3.connect(path / "meta.sqlite") as db:
        if how == "flipped page":
            page = page_of(path, "other")
            (blob,) = db.execute("SELECT entries FROM pages WHERE id = ?", (page,)).fetchone()
            flipped = bytearray(blob)
            flipped[5] ^= 0x10
            db.execute("UPDATE pages SET entries = ? WHERE id = ?", (bytes(flipped), page))
            reached = {"other"}
        elif how == "missing parent":
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute("DELETE FROM snapshots WHERE key = 'child'")
            reached = {"child", "top"}
        elif how == "bad labels":
            db.execute("UPDATE snapshots SET labels = '{not json' WHERE key = 'other'")
            reached = {"other"}
        else:
            raise AssertionError(how)
    db.close()
    return reached


HOW = ["truncated data", "flipped page", "missing parent", "bad labels"]


@pytest.mark.parametrize("how", HOW)
def test_check_of_a_damaged_store_reports_every_problem_and_changes_nothing(engine, tmp_path, how):
    path = tmp_path / "s"
    build(path, engine)
    reached = damage(path, how)
    before = digest(path)
    with cowstore.open(path, readonly=True, engine=engine) as s:
        report = s.check(data=True)
    assert not report.ok
    named = {p.where.split("'")[1] for p in report.problems if p.where.startswith("snapshot '")}
    assert reached - {"child", "top"} <= named or how == "truncated data"
    assert digest(path) == before


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_store_opens_read_only_and_serves_its_intact_snapshots(engine, tmp_path, how):
    path = tmp_path / "s"
    data = build(path, engine)
    reached = damage(path, how)
    before = digest(path)
    with cowstore.open(path, readonly=True, engine=engine) as s:
        names = {i.name for i in s.walk()}
        assert set(data) - reached <= names
        for key in set(data) - reached:
            assert s.reader(key).pread(SIZE, 0) == data[key], key
        for key in reached & names:
            with pytest.raises(errors.Corruption, match=repr(key)):
                s.reader(key)
        with pytest.raises(errors.ReadOnly):
            s.prepare("new", size=SIZE)
    assert digest(path) == before


def test_a_damaged_setting_is_a_one_line_error(engine, tmp_path):
    path = tmp_path / "s"
    build(path, engine)
    with sqlite3.connect(path / "meta.sqlite") as db:
        db.execute("UPDATE settings SET value = 3000 WHERE name = 'chunk_size'")
    db.close()
    with pytest.raises(errors.Corruption, match="chunk_size"):
        cowstore.open(path, engine=engine)
