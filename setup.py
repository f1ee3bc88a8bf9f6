"""The extension list; everything else is in pyproject.toml.

The module's root is ext/cowstore/engines/_cengine.pyx: Cython pairs a module with the .pxd
of its full dotted name. The pieces it includes (core/, the binding) are found through
`include_path`, and the C headers through `include_dirs`; the generated C goes to build/.
"""

import os
from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

extra = os.environ.get("COWSTORE_CFLAGS", "").split()

setup(
    ext_modules=cythonize(
        [
            Extension(
                "cowstore.engines._cengine",
                ["ext/cowstore/engines/_cengine.pyx"],
                include_dirs=["ext/include"],
                # Every source the module is built from, so that an sdist holds them.
                depends=sorted(glob("ext/**/*.p[xy][xid]", recursive=True) + glob("ext/include/*.h")),
                extra_compile_args=["-O3", *extra],
                extra_link_args=extra,
            )
        ],
        include_path=["ext"],
        build_dir="build",
        language_level=3,
    ),
)
