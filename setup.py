"""The extension list; everything else is in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

extra = os.environ.get("COWSTORE_CFLAGS", "").split()

setup(
    ext_modules=cythonize(
        [
            Extension(
                "cowstore.engines._cengine",
                ["ext/_cengine.pyx"],
                extra_compile_args=["-O3", *extra],
                extra_link_args=extra,
            )
        ],
        language_level=3,
    ),
)
