"""spec/vectors: the writer reproduces every golden patch; every invalid one fails as documented."""

from __future__ import annotations

import json
import os

import pytest
import zstandard

import nnpatch
from nnpatch import differ

from .conftest import read

VECTORS = os.path.join(os.path.dirname(__file__), os.pardir, "spec", "vectors")
with open(os.path.join(VECTORS, "vectors.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)


def path(rel: str) -> str:
    return os.path.join(VECTORS, rel)


def digest(p) -> str:
    """File digest, or a model directory's directory digest (FORMAT.md section 8)."""
    if os.path.isdir(p):
        from nnpatch.weights.source import open_source

        with open_source(p) as s:
            return s.file_digest()
    return nnpatch.hash_file(p)


def contents(p) -> dict:
    """Every file under ``p`` (or ``p`` itself) by relative path, with its bytes."""
    if not os.path.isdir(p):
        return {"": read(p)}
    return {os.path.relpath(os.path.join(d, f), p): read(os.path.join(d, f))
            for d, _, files in os.walk(p) for f in files}


def needs(vec) -> None:
    """Skip a vector whose format needs an optional package (the ONNX one: the onnx extra)."""
    if vec.get("requires"):
        pytest.importorskip(vec["requires"])


@pytest.mark.parametrize("vec", MANIFEST["valid"], ids=lambda v: v["name"])
def test_valid_vector_applies_exactly(vec, tmp_path, backend):
    needs(vec)
    assert digest(path(vec["base"])) == vec["base_blake3"]
    assert nnpatch.hash_file(path(vec["patch"])) == vec["patch_blake3"]
    out = tmp_path / "out"
    nnpatch.apply(path(vec["base"]), path(vec["patch"]), out)
    assert contents(out) == contents(path(vec["target"]))
    assert digest(out) == vec["target_blake3"]


@pytest.mark.parametrize("vec", MANIFEST["valid"], ids=lambda v: v["name"])
def test_writer_reproduces_golden_patch(vec, tmp_path, monkeypatch):
    needs(vec)
    # the golden patches name their writer "nnpatch vectors" (spec/generate_vectors.py pins it), so
    # that they do not change with each release; everything else is the writer's own bytes
    monkeypatch.setattr(differ, "__version__", "vectors")
    if zstandard.ZSTD_VERSION != tuple(MANIFEST["zstd_version"]):
        pytest.skip(f"golden patches were made with zstd {MANIFEST['zstd_version']}, this is "
                    f"{zstandard.ZSTD_VERSION}: compressed bytes may differ (applying them is still tested)")
    out = tmp_path / "p.nnpatch"
    # a qrows vector names its deltas file relative to spec/vectors
    options = {k: path(v) if k == "quantized" else v for k, v in vec["options"].items()}
    nnpatch.diff(path(vec["base"]), path(vec["target"]), out, level=MANIFEST["level"], **options)
    assert read(out) == read(path(vec["patch"]))


@pytest.mark.parametrize("vec", MANIFEST["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_fails_as_documented(vec, tmp_path):
    needs(vec)  # nnpatch reads a GGUF base with the gguf package
    out = tmp_path / "out.safetensors"
    base_before = contents(path(vec["base"]))
    with pytest.raises(nnpatch.NnpatchError) as info:
        nnpatch.apply(path(vec["base"]), path(vec["patch"]), out, **vec["apply_options"])
    assert type(info.value).__name__ == vec["error"]
    expected = vec["message"].replace("{patch}", path(vec["patch"])).replace("{base}", path(vec["base"]))
    assert str(info.value) == expected
    assert not out.exists()
    assert contents(path(vec["base"])) == base_before
    assert os.listdir(tmp_path) == []  # no temporary file or directory left behind


def test_vectors_are_current():
    """The generator, run again, reproduces spec/vectors exactly (or the spec changed without them)."""
    if zstandard.ZSTD_VERSION != tuple(MANIFEST["zstd_version"]):
        pytest.skip("different zstd version")
    pytest.importorskip("onnx")  # the generator writes the ONNX vector too
    pytest.importorskip("gguf")  # and the GGUF one
    import subprocess
    import sys

    gen = os.path.join(VECTORS, os.pardir, "generate_vectors.py")
    p = subprocess.run([sys.executable, gen], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
