"""Chooses the engine: the Cython accelerator unless it is missing or forbidden."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from . import python

ENGINES: dict[str, ModuleType] = {"python": python}

try:
    _cengine = importlib.import_module("cowstore.engines._cengine")
except ImportError as exc:
    if os.environ.get("COWSTORE_REQUIRE_EXTENSION"):
        raise ImportError(f"COWSTORE_REQUIRE_EXTENSION is set but the extension is missing: {exc}") from exc
    _missing: ImportError | None = exc
else:
    ENGINES["cython"] = _cengine
    _missing = None

if os.environ.get("COWSTORE_PURE_PYTHON"):
    DEFAULT = "python"
elif _missing is not None:
    warnings.warn(
        f"cowstore's Cython engine cannot be imported ({_missing}); using the slow pure-Python engine",
        RuntimeWarning,
        stacklevel=2,
    )
    DEFAULT = "python"
else:
    DEFAULT = "cython"


def engine_module(name: str | None) -> ModuleType:
    """The engine module called `name` ("cython" or "python"); None means the default."""
    from ..errors import InvalidArgument

    name = DEFAULT if name is None else name
    try:
        return ENGINES[name]
    except KeyError:
        raise InvalidArgument(f"engine {name!r} is not available; have {sorted(ENGINES)}") from None
