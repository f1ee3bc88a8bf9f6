"""Fixtures that run every test against both engines, in memory and on disk."""

from __future__ import annotations

import os

import pytest

import cowstore
from cowstore import engines

ENGINES = ["cython", "python"]
CHUNK = 4096
SIZE = 1 << 20


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """An engine name; the Cython one is required in CI."""
    name = request.param
    if name not in engines.ENGINES:
        if os.environ.get("CI"):
            pytest.fail("the Cython extension is not built, and CI requires it")
        pytest.skip("the Cython extension is not built")
    return name


@pytest.fixture(params=["memory", "disk"])
def store(engine, request, tmp_path):
    """A small store (4 KiB chunks, 1 MiB default size) in memory or in a directory."""
    if request.param == "memory":
        s = cowstore.memory(chunk_size=CHUNK, default_size=SIZE, engine=engine)
    else:
        s = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine)
    yield s
    s.close()


@pytest.fixture
def disk_store(engine, tmp_path):
    """Opens (and reopens) one on-disk store; every store it opened is closed at the end."""
    opened = []

    def open_store(**kw):
        kw.setdefault("engine", engine)
        s = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, **kw)
        opened.append(s)
        return s

    yield open_store
    for s in opened:
        s.close()
