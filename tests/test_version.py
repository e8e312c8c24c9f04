"""The project has one version number: the Python package's (nnpatch/_version.py, which
pyproject.toml reads) and the native library's (native/include/nnpatch.h)."""

from __future__ import annotations

import os
import re

import nnpatch
from nnpatch._version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_the_package_and_the_native_header_carry_one_version():
    text = _read("native", "include", "nnpatch.h")
    # NNP_VERSION_STRING is derived from these three there (tests/native/test_native_build.py compiles it)
    parts = [re.search(rf"#define NNP_VERSION_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "RELEASE")]
    assert all(parts), "nnpatch.h has no NNP_VERSION_MAJOR/MINOR/RELEASE"
    assert ".".join(m.group(1) for m in parts) == __version__ == nnpatch.__version__


def test_pyproject_takes_its_version_from_the_package():
    pyproject = _read("pyproject.toml")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = {attr = "nnpatch._version.__version__"}' in pyproject
    assert not re.search(r'(?m)^version = "', pyproject)
