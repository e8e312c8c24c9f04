"""The project's one version number: the Python package's (pyproject.toml reads it from here) and
the native library's (native/include/nnpatch.h), kept equal by tests/test_version.py."""

__version__ = "0.5.0"
