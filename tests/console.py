"""The `cowstore` command as tests run it: the installed console script, with this checkout's
package first on the path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def command() -> list[str]:
    """The installed console script, else the same entry point through the interpreter."""
    script = Path(sys.executable).with_name("cowstore")
    if script.exists():
        return [str(script)]
    if os.environ.get("CI"):
        pytest.fail("the cowstore console script is not installed next to the interpreter")
    return [sys.executable, "-c", "import sys; from cowstore.cli import main; sys.exit(main())"]


def env(engine: str | None = None) -> dict[str, str]:
    """The environment for the command; `engine` "python" forces the pure engine."""
    extra = {"COWSTORE_PURE_PYTHON": "1"} if engine == "python" else {}
    return {
        **os.environ,
        **extra,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
