"""Shared fixtures: tiny deterministic models in every dtype, written to tmp_path."""

from __future__ import annotations

import functools
import os
import signal
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from nnpatch import dtypes, kernel
from nnpatch.weights import write_safetensors

# the spec's header-editing tools (spec/crafting.py) are importable as ``crafting``
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec"))
# and so are this folder's helpers (``from conftest import assert_proven``)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile("fast", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "fast"))

ALL_DTYPES = sorted(dtypes.ITEMSIZE)


def pytest_configure(config):
    """Tests that send SIGINT to a child expect it to be caught. A shell starts a background job
    (`make test &`) with SIGINT ignored, and an ignored signal stays ignored across exec, so
    every child would ignore it too: give this process Python's own handler, which exec resets
    to the default in each child."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def float_like(rng: np.random.Generator, dtype: str, shape) -> bytes:
    """Bytes that look like trained weights for float dtypes, random otherwise."""
    n = int(np.prod(shape))
    if dtype == "F32":
        return (rng.standard_normal(n) * 0.05).astype("<f4").tobytes()
    if dtype == "F64":
        return (rng.standard_normal(n) * 0.05).astype("<f8").tobytes()
    if dtype == "F16":
        return (rng.standard_normal(n) * 0.05).astype("<f2").tobytes()
    if dtype == "BF16":
        f = (rng.standard_normal(n) * 0.05).astype("<f4").view("<u4")
        return (f >> 16).astype("<u2").tobytes()
    if dtype == "BOOL":
        return rng.integers(0, 2, size=n, dtype=np.uint8).tobytes()
    return random_bytes(rng, n * dtypes.ITEMSIZE[dtype])


def save(path, tensors: dict, metadata=None) -> str:
    """tensors: name -> (dtype, shape, bytes)."""
    write_safetensors(path, tensors, metadata)
    return os.fspath(path)


def make_pair(tmp_path, seed: int = 0, *, share: float = 0.1):
    """A base and a target covering every op: rows, elements, whole, add, remove, reshape."""
    rng = np.random.default_rng(seed)
    base = {
        "conv.weight": ("F32", (32, 8, 3, 3), float_like(rng, "F32", (32, 8, 3, 3))),
        "conv.bias": ("F32", (32,), float_like(rng, "F32", (32,))),
        "emb": ("BF16", (100, 16), float_like(rng, "BF16", (100, 16))),
        "dense": ("F16", (64, 64), float_like(rng, "F16", (64, 64))),
        "steps": ("I64", (), random_bytes(rng, 8)),
        "old_only": ("U8", (7,), random_bytes(rng, 7)),
        "reshaped": ("F32", (4, 6), float_like(rng, "F32", (4, 6))),
        "same": ("F64", (3, 3), float_like(rng, "F64", (3, 3))),
        "empty": ("F32", (0, 5), b""),
    }
    target = dict(base)
    w = np.frombuffer(base["conv.weight"][2], "<f4").reshape(32, -1).copy()
    rows = rng.choice(32, size=max(1, int(share * 32)), replace=False)
    w[rows] += 0.01
    target["conv.weight"] = ("F32", (32, 8, 3, 3), w.tobytes())
    b = np.frombuffer(base["conv.bias"][2], "<f4").copy()
    b[rows] = -0.0
    target["conv.bias"] = ("F32", (32,), b.tobytes())
    e = np.frombuffer(base["emb"][2], "<u2").copy()
    e[[5, 77]] ^= 0x0101
    target["emb"] = ("BF16", (100, 16), e.tobytes())
    target["dense"] = ("F16", (64, 64), float_like(rng, "F16", (64, 64)))
    target["steps"] = ("I64", (), (12345).to_bytes(8, "little"))
    del target["old_only"]
    target["reshaped"] = ("F32", (6, 4), base["reshaped"][2])
    target["new_only"] = ("F8_E4M3", (3, 5), random_bytes(rng, 15))
    nan = np.array([np.nan, -0.0, 0.0, np.inf], dtype="<f4").view("<u4").copy()
    nan[0] |= 0x1234  # a NaN payload that float comparison would lose
    target["nan"] = ("F32", (4,), nan.tobytes())
    base_path = save(tmp_path / "base.safetensors", base, {"format": "pt", "v": "1"})
    target_path = save(tmp_path / "target.safetensors", target, {"format": "pt", "v": "2"})
    return base_path, target_path


@pytest.fixture
def pair(tmp_path):
    return functools.partial(make_pair, tmp_path)


@pytest.fixture(params=["c", "numpy"])
def backend(request):
    """Run a test once per kernel backend."""
    if request.param == "c" and kernel._ext is None:
        pytest.skip("C kernel not built")
    previous = kernel.backend
    kernel.select(request.param)
    yield request.param
    kernel.select(previous)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_proven(result, target, mode: str = "default", *, file_digest: str | None = None) -> None:
    """An apply reports only what it proved: the file (or directory) digest, which every mode hashes
    again from the output, and the model digest unless ``touched``."""
    from nnpatch.hashing import hash_file
    from nnpatch.weights import open_model

    assert result.blake3 == (file_digest or hash_file(target))
    if mode == "touched":
        assert result.model_blake3 is None
    else:
        with open_model(target) as m:
            assert result.model_blake3 == m.digest().hex()
