"""The apply engine: verification modes, copy fallback, chains, revert, stdin streaming.

Every apply is checked byte for byte and by BLAKE3 against the real target.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch import applier, kernel
from nnpatch.applier import oscopy
from nnpatch.applier import apply_chain, revert
from nnpatch.cli import cli
from nnpatch.errors import BaseMismatchError, IntegrityError, PatchFormatError
from nnpatch.hashing import hash_file

from .conftest import read, save
from conftest import assert_proven


def _model(path, tensors: dict) -> str:
    return save(path, {k: (d, v.shape, np.ascontiguousarray(v).tobytes()) for k, (d, v) in tensors.items()},
                {"format": "pt"})


def _series(rng, n: int = 4) -> list[dict]:
    """n versions of a small model; each step nudges some rows (delta-coded, so revertible)."""
    m = {
        "a.weight": ("F32", (rng.standard_normal((64, 96)) * 0.05).astype("<f4")),
        "b.weight": ("F16", (rng.standard_normal((48, 40)) * 0.05).astype("<f2")),
        "bias": ("F32", (rng.standard_normal(96) * 0.05).astype("<f4")),
        "emb": ("BF16", rng.integers(0, 1 << 16, (30, 16), dtype=np.uint16)),
    }
    out = [m]
    for _ in range(n - 1):
        m = {k: (d, v.copy()) for k, (d, v) in m.items()}
        for k in ("a.weight", "b.weight"):
            v = m[k][1]
            rows = rng.choice(v.shape[0], v.shape[0] // 8, replace=False)
            v[rows] = (v[rows] * np.asarray(1.001, v.dtype)).astype(v.dtype)
        out.append(m)
    return out


def _check(out, target) -> None:
    assert read(out) == read(target)
    assert hash_file(out) == hash_file(target)


# --- verification modes ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["default", "full", "touched"])
def test_apply_each_mode(tmp_path, pair, backend, mode):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    out = tmp_path / "out.safetensors"
    r = applier.apply(base, patch, out, verify=mode)
    _check(out, target)
    assert r.verify == mode
    assert_proven(r, target, mode)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_cli_verify_option(tmp_path, pair):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli, ["apply", base, str(patch), "-o", str(out), "--verify", "full", "--json"])
    assert r.exit_code == 0, r.output
    _check(out, target)
    assert '"verify": "full"' in r.stdout
    r = CliRunner().invoke(cli, ["apply", base, str(patch), "-o", str(out), "--verify", "sometimes"])
    assert r.exit_code == 2


def test_touched_mode_trade_off(tmp_path, pair):
    """touched does not hash untouched base tensors, but the output's file digest, proven in every mode,
    still refuses the output they would make; default names the wrong base; both catch touched ones."""
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    from nnpatch.weights import SafetensorsFile

    with SafetensorsFile(base) as f:
        t = {n: (i.dtype, i.shape, bytearray(f.raw(n).tobytes())) for n, i in f.tensors.items()}
    t["same"][2][0] ^= 1  # untouched by the patch
    other = save(tmp_path / "other.safetensors", {k: (d, s, bytes(b)) for k, (d, s, b) in t.items()})
    out = tmp_path / "out.safetensors"
    with pytest.raises(BaseMismatchError, match="tensor contents differ"):
        applier.apply(other, patch, out)
    assert not out.exists()
    with pytest.raises(IntegrityError, match="result does not match the patch's target"):
        applier.apply(other, patch, out, verify="touched")
    assert not out.exists()
    t["same"][2][0] ^= 1
    t["conv.weight"][2][5] ^= 1  # touched by the patch
    other = save(tmp_path / "other.safetensors", {k: (d, s, bytes(b)) for k, (d, s, b) in t.items()})
    for mode in ("touched", "default", "full"):
        with pytest.raises(BaseMismatchError, match="conv.weight"):
            applier.apply(other, patch, out, verify=mode)
        assert not out.exists()


def test_copy_file_range_fallback(tmp_path, pair, monkeypatch, backend):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(oscopy, "_use_copy_file_range", True)
    out = tmp_path / "out.safetensors"
    applier.apply(base, patch, out, verify="full")
    _check(out, target)
    assert oscopy._use_copy_file_range is False


def test_kernel_error_is_a_format_error(tmp_path, pair, monkeypatch):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)

    def bad(*a, **k):
        raise ValueError("index 99 at position 0 is out of range for 32 rows")
    monkeypatch.setattr(kernel, "scatter_rows", bad)
    monkeypatch.setattr(kernel, "scatter_elements", bad)
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli, ["apply", base, str(patch), "-o", str(out)])
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {patch}: ") and "out of range" in lines[0]
    assert "Traceback" not in r.output and not out.exists()
    with pytest.raises(PatchFormatError):
        applier.apply(base, patch, out)


# --- chains ------------------------------------------------------------------------------------

def _chain(tmp_path, rng, reversible=False):
    versions = _series(rng, 4)
    paths = [_model(tmp_path / f"m{i}.safetensors", v) for i, v in enumerate(versions)]
    # the last link also adds and removes tensors (layout change)
    last = dict(versions[-1])
    del last["bias"]
    last["head"] = ("F32", (rng.standard_normal((8, 96)) * 0.05).astype("<f4"))
    paths[-1] = _model(tmp_path / "m3.safetensors", last)
    patches = []
    for i in range(3):
        p = tmp_path / f"p{i + 1}.nnpatch"
        nnpatch.diff(paths[i], paths[i + 1], p, reversible=reversible)
        patches.append(str(p))
    return paths, patches


def test_chain_of_three(tmp_path, backend):
    paths, patches = _chain(tmp_path, np.random.default_rng(3))
    out = tmp_path / "out.safetensors"
    r = apply_chain(paths[0], patches, out)
    _check(out, paths[3])
    assert r.links == 3
    out2 = tmp_path / "out2.safetensors"
    res = CliRunner().invoke(cli, ["apply", paths[0], *patches, "-o", str(out2), "--verify", "full"])
    assert res.exit_code == 0, res.output
    _check(out2, paths[3])


def test_broken_chain_is_refused_up_front(tmp_path):
    paths, patches = _chain(tmp_path, np.random.default_rng(4))
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(cli, ["apply", paths[0], patches[0], patches[2], "-o", str(out)])
    assert res.exit_code == 4 and "broken chain" in res.stderr
    assert not out.exists()
    res = CliRunner().invoke(cli, ["apply", paths[1], *patches, "-o", str(out)])  # wrong base for link 1
    assert res.exit_code == 4 and "wrong base" in res.stderr
    assert not out.exists()


# --- revert -----------------------------------------------------------------------------------

def test_revert_exact(tmp_path, backend):
    paths, patches = _chain(tmp_path, np.random.default_rng(5), reversible=True)
    for i, p in enumerate(patches):
        out = tmp_path / f"back{i}.safetensors"
        r = revert(paths[i + 1], p, out)
        _check(out, paths[i])
        assert r.blake3 == hash_file(paths[i])
    out = tmp_path / "cli.safetensors"
    res = CliRunner().invoke(cli, ["revert", paths[3], patches[2], "-o", str(out)])
    assert res.exit_code == 0, res.output
    _check(out, paths[2])


def test_revert_refuses_a_plain_patch(tmp_path, pair):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(cli, ["revert", target, str(patch), "-o", str(out)])
    assert res.exit_code == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reversible" in lines[0] and not out.exists()


def test_revert_wrong_input(tmp_path):
    paths, patches = _chain(tmp_path, np.random.default_rng(6), reversible=True)
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(cli, ["revert", paths[2], patches[0], "-o", str(out)])  # not p1's target
    assert res.exit_code == 4, res.output
    assert not out.exists()


# --- stdin streaming -----------------------------------------------------------------------------

def _run_stdin(base, data: bytes, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnpatch", "apply", base, "-", "-o", str(out)], input=data,
                          capture_output=True)


def test_apply_from_stdin(tmp_path, pair):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    out = tmp_path / "out.safetensors"
    p = _run_stdin(base, read(patch), out)
    assert p.returncode == 0, p.stderr
    _check(out, target)


@pytest.mark.parametrize("damage", ["cut", "cut-header", "flip"])
def test_broken_stdin_stream_exits_3_without_output(tmp_path, pair, damage):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    data = bytearray(read(patch))
    if damage == "cut":
        data = data[: len(data) - 100]
    elif damage == "cut-header":
        data = data[:40]
    else:
        data[len(data) // 2] ^= 1
    out = tmp_path / "out.safetensors"
    p = _run_stdin(base, bytes(data), out)
    assert p.returncode == 3, p.stderr
    err = p.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: <stdin>: ")
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["base.safetensors", "target.safetensors", "p.nnpatch"])
