"""The extension list; everything else is in pyproject.toml.

Two modules: the engine, rooted at ext/cowstore/engines/_cengine.pyx, and the FUSE server,
ext/cowstore/fuse/_cserver.pyx, linked with libfuse3. Cython pairs a module with the .pxd
of its full dotted name. The pieces it includes (core/, the binding) are found through
`include_path`, and the C headers through `include_dirs`; the generated C goes to build/.
"""

import os
import subprocess
from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

extra = os.environ.get("COWSTORE_CFLAGS", "").split()
# Every source the modules are built from, so that an sdist holds them.
depends = sorted(glob("ext/**/*.p[xy][xid]", recursive=True) + glob("ext/include/*.h"))


def pkg_config(package: str) -> dict[str, list[str]]:
    """Compiler and linker flags of a system library (libfuse3: Debian's libfuse3-dev)."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", package], capture_output=True, text=True, check=True)
        libs = subprocess.run(["pkg-config", "--libs", package], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"{package} is needed to build cowstore (apt-get install libfuse3-dev pkg-config): {exc}")
    found: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [], "libraries": [], "cflags": []}
    for flag in cflags.stdout.split() + libs.stdout.split():
        for prefix, key in (("-I", "include_dirs"), ("-L", "library_dirs"), ("-l", "libraries")):
            if flag.startswith(prefix):
                found[key].append(flag[2:])
                break
        else:
            found["cflags"].append(flag)
    return found


fuse = pkg_config("fuse3")

setup(
    ext_modules=cythonize(
        [
            Extension(
                "cowstore.engines._cengine",
                ["ext/cowstore/engines/_cengine.pyx"],
                include_dirs=["ext/include"],
                depends=depends,
                extra_compile_args=["-O3", *extra],
                extra_link_args=extra,
            ),
            Extension(
                "cowstore.fuse._cserver",
                ["ext/cowstore/fuse/_cserver.pyx"],
                include_dirs=["ext/include", *fuse["include_dirs"]],
                library_dirs=fuse["library_dirs"],
                libraries=fuse["libraries"],
                depends=depends,
                extra_compile_args=["-O3", *fuse["cflags"], *extra],
                extra_link_args=extra,
            ),
        ],
        include_path=["ext"],
        build_dir="build",
        language_level=3,
    ),
)
