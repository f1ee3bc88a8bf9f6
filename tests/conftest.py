"""Fixtures shared by the suite: the engine under test, and small stores on it.

`engine_module` is the one engine parametrisation: a test that uses it, or a fixture built
on it (`engine`, `engine_class`, `store`, `disk_store`), runs once per engine. The Cython
run carries the `cython` mark (`-m "not cython"` leaves it out); where the extension is not
built it is skipped, and in CI (`CI` set) it fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

import cowstore
from cowstore import engines

ENGINES = ("cython", "python")
_UNBUILT = pytest.mark.skipif(
    "cython" not in engines.ENGINES and not os.environ.get("CI"), reason="the Cython extension is not built"
)
ENGINE_PARAMS = [pytest.param("cython", marks=[pytest.mark.cython, _UNBUILT]), "python"]
"""The engines' names as parameters, for a test that needs two engines at once (a writer and
a reader); a test of one engine takes the `engine_module` fixture or one built on it."""
CHUNK = 4096
SIZE = 1 << 20


@pytest.fixture(scope="session", params=ENGINE_PARAMS)
def engine_module(request: pytest.FixtureRequest) -> ModuleType:
    """The engine under test, as its module."""
    if request.param not in engines.ENGINES:
        pytest.fail("the Cython extension is not built, and CI requires it")
    return engines.ENGINES[request.param]


@pytest.fixture(scope="session")
def engine(engine_module: ModuleType) -> str:
    """The engine under test by name, as `cowstore.open(engine=...)` takes it."""
    return next(name for name, module in engines.ENGINES.items() if module is engine_module)


@pytest.fixture(scope="session")
def engine_class(engine_module: ModuleType) -> type:
    """The engine under test's `Engine` class, for tests that drive an engine directly."""
    return engine_module.Engine


@pytest.fixture(params=["memory", "disk"])
def store(engine: str, request: pytest.FixtureRequest, tmp_path) -> Iterator[cowstore.Store]:
    """A small store (4 KiB chunks, 1 MiB default size) in memory or in a directory."""
    if request.param == "memory":
        s = cowstore.memory(chunk_size=CHUNK, default_size=SIZE, engine=engine)
    else:
        s = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine)
    yield s
    s.close()


@pytest.fixture
def disk_store(engine: str, tmp_path) -> Iterator[Callable[..., cowstore.Store]]:
    """Opens (and reopens) one on-disk store; every store it opened is closed at the end."""
    opened = []

    def open_store(**kw: Any) -> cowstore.Store:
        kw.setdefault("engine", engine)
        s = cowstore.open(tmp_path / "store", create=True, chunk_size=CHUNK, default_size=SIZE, **kw)
        opened.append(s)
        return s

    yield open_store
    for s in opened:
        s.close()
