"""Build hook for the optional C kernel; all other metadata is in pyproject.toml.

``nnpatch._kernel`` is a plain CPython extension (buffer protocol only, no
numpy headers), so it needs nothing but a C compiler and the Python headers.
It is ``optional``: where it cannot be built, installation still succeeds and
``nnpatch.kernel`` falls back to its numpy implementation.
"""

import sys

from setuptools import Extension, setup

# The source is C99; no -std= flag is forced so that newer Python headers,
# which may assume C11, keep compiling.
_cflags = ["/O2"] if sys.platform == "win32" else ["-O3"]

setup(
    ext_modules=[
        Extension(
            "nnpatch._kernel",
            ["nnpatch/_kernel.c"],
            optional=True,
            extra_compile_args=_cflags,
        )
    ]
)
