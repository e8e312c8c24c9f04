"""nnpatch-apply cross-compiled for aarch64 (`make native-aarch64`, gcc-aarch64-linux-gnu)
and run under qemu-aarch64 as a phone's or a board's CPU would run it: every valid
safetensors vector rebuilds its target byte for byte, every invalid one fails as the x86
binary does (same exit code, same message), and a differential sample of Python-made
patches (every delta stage the differ picks for these dtypes) rebuilds its targets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import nnpatch
from nnpatch.weights import write_safetensors

from .conftest import VECTORS
from .qrows_cases import make_pair, second_link

INDEX = json.loads((VECTORS / "vectors.json").read_text())
# directory and ONNX targets are outside the native applier's scope (it refuses them, exit 3)
VALID = [v for v in INDEX["valid"] if v["name"] not in ("directory", "onnx") and "requires" not in v]
INVALID = INDEX["invalid"]


def test_is_aarch64(aarch64):
    head = aarch64.apply.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2, "a 64-bit ELF"
    assert int.from_bytes(head[18:20], "little") == 183, "e_machine EM_AARCH64"


def test_version(aarch64):
    r = aarch64.run("--version")
    assert r.returncode == 0, r.stderr
    assert "(format 1.5)" in r.stdout.decode()


def test_the_qrows_vectors_are_here():
    """Format 1.3's qrows vectors run below like every other one (the arithmetic on ARM)."""
    assert {"qrows-f32", "qrows-bf16", "qrows-f16"} <= {v["name"] for v in VALID}
    assert sum(1 for v in INVALID if v["name"].startswith("qrows-")) >= 7


@pytest.mark.parametrize("verify", ["default", "full", "touched"])
@pytest.mark.parametrize("vec", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector(aarch64, vec, verify, tmp_path):
    out = tmp_path / "out.safetensors"
    r = aarch64.run(VECTORS / vec["base"], VECTORS / vec["patch"], "-o", out, "--verify", verify, "--quiet")
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == (VECTORS / vec["target"]).read_bytes()


def test_gguf_vector(aarch64, tmp_path):
    """The GGUF vector (an extents target, format 1.4): new file, standard input and in place, on ARM
    (no GGUF parser in C: the patch's extent tables)."""
    vec = next(v for v in INDEX["valid"] if v["name"] == "gguf")
    target = (VECTORS / vec["target"]).read_bytes()
    out = tmp_path / "out.gguf"
    r = aarch64.run(VECTORS / vec["base"], VECTORS / vec["patch"], "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == target
    out.unlink()
    r = aarch64.run(VECTORS / vec["base"], "-", "-o", out, input=(VECTORS / vec["patch"]).read_bytes())
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == target
    model = tmp_path / "model.gguf"
    model.write_bytes((VECTORS / vec["base"]).read_bytes())
    r = aarch64.run("--in-place", model, VECTORS / vec["patch"])
    assert r.returncode == 0, r.stderr.decode()
    assert model.read_bytes() == target


def test_stdin_chain(aarch64, tmp_path):
    """The patch from standard input, and a chain of two patches in one pass."""
    vec = next(v for v in VALID if v["name"] == "all-ops-reversible")
    out = tmp_path / "out.safetensors"
    r = aarch64.run(VECTORS / vec["base"], "-", "-o", out, input=(VECTORS / vec["patch"]).read_bytes())
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == (VECTORS / vec["target"]).read_bytes()
    # base -> target -> base with a reverse patch made here
    back = tmp_path / "back.nnpatch"
    nnpatch.diff(VECTORS / vec["target"], VECTORS / vec["base"], back)
    out2 = tmp_path / "round.safetensors"
    r = aarch64.run(VECTORS / vec["base"], VECTORS / vec["patch"], back, "-o", out2)
    assert r.returncode == 0, r.stderr.decode()
    assert out2.read_bytes() == (VECTORS / vec["base"]).read_bytes()


@pytest.mark.parametrize("vec", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_as_x86(aarch64, native, vec, tmp_path):
    args = [VECTORS / vec["base"], VECTORS / vec["patch"], "-o", tmp_path / "out"]
    if "verify" in vec["apply_options"]:
        args += ["--verify", vec["apply_options"]["verify"]]
    arm, x86 = aarch64.run(*args), native.run(*args)
    assert arm.returncode != 0, "an invalid vector must fail"
    assert (arm.returncode, arm.stderr) == (x86.returncode, x86.stderr)
    assert not (tmp_path / "out").exists()


def test_in_place_and_recover(aarch64, tmp_path):
    vec = next(v for v in VALID if v["name"] == "rows-f32")
    model = tmp_path / "model.safetensors"
    shutil.copyfile(VECTORS / vec["base"], model)
    r = aarch64.run("--in-place", model, VECTORS / vec["patch"])
    assert r.returncode == 0, r.stderr.decode()
    assert model.read_bytes() == (VECTORS / vec["target"]).read_bytes()
    r = aarch64.run("--recover", model)
    assert r.returncode == 0, r.stderr.decode()
    assert model.read_bytes() == (VECTORS / vec["target"]).read_bytes()


# A differential sample: pairs made here, diffed by Python, applied under qemu.
DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "U8": np.uint8,
          "I64": np.int64}


def _pair(seed: int, tmp_path):
    rng = np.random.default_rng(seed)
    old, new = {}, {}
    for i, (name, dt) in enumerate(DTYPES.items()):
        shape = [(), (0, 3), (7,), (16, 9), (5, 4, 3)][(seed + i) % 5]
        if np.issubdtype(dt, np.floating):
            a = (rng.standard_normal(shape) * 0.05).astype(dt)
        else:
            a = rng.integers(0, 100, shape).astype(dt)
        b = a.copy()
        if a.size:
            flat = b.reshape(-1)
            k = rng.integers(1, flat.size + 1)
            idx = rng.choice(flat.size, k, replace=False)
            flat[idx] = flat[idx] + dt(1) if not np.issubdtype(dt, np.floating) else flat[idx] * dt(1.01)
        old[f"t{i}"] = (name, a.shape, a.tobytes())
        new[f"t{i}"] = (name, b.shape, b.tobytes())
    if seed % 2:  # a removed and an added tensor
        del new["t0"]
        new["extra"] = ("F32", (3, 2), np.arange(6, dtype=np.float32).tobytes())
    o, n = tmp_path / f"old{seed}.safetensors", tmp_path / f"new{seed}.safetensors"
    write_safetensors(o, old)
    write_safetensors(n, new)
    return o, n


@pytest.mark.parametrize("seed", range(6))
def test_differential_sample(aarch64, seed, tmp_path):
    o, n = _pair(seed, tmp_path)
    p = tmp_path / "p.nnpatch"
    nnpatch.diff(o, n, p, level=3, reversible=bool(seed % 3 == 2))
    out = tmp_path / "out.safetensors"
    r = aarch64.run(o, p, "-o", out, "--verify", "full")
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == n.read_bytes()


# qrows (format 1.3): the binary32 arithmetic of FORMAT.md 7.5 with specials (NaN payloads,
# infinities, subnormals, signed zeros, overflow) in F32, BF16 and F16, 8- and 4-bit codes: the
# aarch64 build must write exactly the bytes numpy's reference wrote on x86 (tests/native/qrows_cases.py).
@pytest.mark.parametrize("seed", range(6))
def test_qrows_differential_sample(aarch64, native, seed, tmp_path):
    o, n, deltas = make_pair(seed, tmp_path, big=seed == 1)
    p = tmp_path / "q.nnpatch"
    nnpatch.diff(o, n, p, level=3, quantized=deltas)
    out = tmp_path / "out.safetensors"
    r = aarch64.run(o, p, "-o", out, "--verify", "full")
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == n.read_bytes()


def test_qrows_in_place_and_chain(aarch64, tmp_path):
    vec = next(v for v in VALID if v["name"] == "qrows-bf16")
    model = tmp_path / "model.safetensors"
    shutil.copyfile(VECTORS / vec["base"], model)
    r = aarch64.run("--in-place", model, VECTORS / vec["patch"])
    assert r.returncode == 0, r.stderr.decode()
    assert model.read_bytes() == (VECTORS / vec["target"]).read_bytes()
    # two qrows links applied as a chain in one pass
    o, n, d1 = make_pair(3, tmp_path)
    new2, d2 = second_link(3, n, tmp_path)
    p1, p2 = tmp_path / "p1.nnpatch", tmp_path / "p2.nnpatch"
    nnpatch.diff(o, n, p1, quantized=d1)
    nnpatch.diff(n, new2, p2, quantized=d2)
    out = tmp_path / "chain.safetensors"
    r = aarch64.run(o, p1, p2, "-o", out, "--verify", "full")
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == new2.read_bytes()
