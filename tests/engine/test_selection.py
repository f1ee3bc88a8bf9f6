"""Which engine is in use, and that both expose one interface."""

from __future__ import annotations

import os
import subprocess
import sys

import cowstore
from cowstore import engines
from cowstore.engines import python as _pyengine


def test_engine_matches_the_environment():
    if os.environ.get("COWSTORE_PURE_PYTHON"):
        assert cowstore.engine == "python"
    elif os.environ.get("COWSTORE_REQUIRE_EXTENSION"):
        assert cowstore.engine == "cython"
    assert cowstore.memory().engine == cowstore.engine


def test_pure_python_variable_forces_the_python_engine():
    out = subprocess.run(
        [sys.executable, "-c", "import cowstore; print(cowstore.engine, cowstore.memory().engine)"],
        env={**os.environ, "COWSTORE_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["python", "python"]


def test_both_engines_export_the_same_names():
    if "cython" not in engines.ENGINES:
        assert not os.environ.get("CI"), "CI requires the extension"
        return
    from cowstore.engines import _cengine

    def public(module):
        return {n for n in dir(module) if not n.startswith("_") and n not in {"annotations"}}

    def methods(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    assert {"Engine", "Changes", "MAX_SLOT"} <= public(_cengine)
    assert methods(_cengine.Engine) == methods(_pyengine.Engine)


def test_unknown_engine_name_is_rejected():
    try:
        cowstore.memory(engine="fortran")
    except cowstore.errors.InvalidArgument as exc:
        assert "fortran" in str(exc)
    else:
        raise AssertionError("engine='fortran' was accepted")


def test_each_engine_has_a_volume_class_whose_hot_methods_are_the_engines():
    from cowstore.volume import Volume, volume_class

    for name, module in engines.ENGINES.items():
        cls = volume_class(module)
        assert issubclass(cls, Volume) and issubclass(cls, module.VolumeBase), name
        for method in ("pread", "preadinto", "pwrite", "write_zeroes", "close"):
            assert getattr(cls, method) is getattr(module.VolumeBase, method), (name, method)
        assert cls._reclaim is Volume._reclaim, name
        store = cowstore.memory(engine=name)
        volume = store.prepare("a", size=4096)
        assert type(volume) is cls
        assert repr(volume) == "<cowstore.Volume 'a' size=4096 rw>"
        store.close()
