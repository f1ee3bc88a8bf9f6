"""The source distribution carries everything the extension needs: built into a fresh venv, it
imports with the Cython engine and round-trips a write."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, **kw) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stderr[-3000:]}"
    return done.stdout


CHECK = """
import cowstore
assert cowstore.engine == "cython", cowstore.engine
with cowstore.memory(chunk_size=4096, default_size=1 << 20) as s:
    v = s.prepare("a")
    v.pwrite(b"sdist", 12345)
    assert v.pread(5, 12345) == b"sdist"
print(cowstore.__file__)
"""


def test_an_sdist_builds_the_extension_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--sdist", "--outdir", dist, ROOT)
    (sdist,) = dist.glob("cowstore-*.tar.gz")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", sdist)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWSTORE_")}
    env["COWSTORE_REQUIRE_EXTENSION"] = "1"
    where = run(python, "-c", CHECK, cwd=tmp_path, env=env).strip()
    assert Path(where).is_relative_to(env_dir), where
