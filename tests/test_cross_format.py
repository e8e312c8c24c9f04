"""Patches are keyed by tensor name, so base and target may be in different formats.

A base may be a PyTorch checkpoint or a sharded Hugging Face directory. A
PyTorch target is written back as a PyTorch file, a sharded one as one
safetensors file (canonical layout); both are proven by the model digest.
"""

from __future__ import annotations

import numpy as np
import pytest

import nnpatch
from nnpatch.weights.sniff import open_model, sniff
from nnpatch.weights.sharded import write_sharded

from .conftest import read, save

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _tensors(seed: int, changed: bool):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((32, 16)).astype("<f4")
    e = rng.integers(0, 2**16, (20, 4), dtype="<u2")
    if changed:
        w = w.copy()
        w[[2, 9]] += np.float32(0.5)
        e = e.copy()
        e[3, 1] ^= 7
    return {"layer.weight": ("F32", w.shape, w.tobytes()), "emb": ("BF16", e.shape, e.tobytes()),
            "step": ("I64", (), (5 if changed else 4).to_bytes(8, "little"))}


def _torch_save(path, tensors):
    from nnpatch.weights.torch_file import save_torch_state

    save_torch_state(str(path), tensors)


def _model_digest(path):
    with open_model(path) as m:
        return nnpatch.model_digest(m)[0]


@pytest.mark.parametrize("base_kind", ["bin", "sharded", "safetensors"])
@pytest.mark.parametrize("target_kind", ["bin", "safetensors"])
def test_cross_format(tmp_path, base_kind, target_kind, backend):
    old, new = _tensors(0, False), _tensors(0, True)
    paths = {}
    for role, tensors, kind in (("base", old, base_kind), ("target", new, target_kind)):
        if kind == "bin":
            paths[role] = tmp_path / f"{role}.bin"
            _torch_save(paths[role], tensors)
        elif kind == "sharded":
            paths[role] = tmp_path / f"{role}-dir"
            write_sharded(paths[role], {"model-00001-of-00002.safetensors": {"emb": tensors["emb"]},
                                        "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items()
                                                                             if k != "emb"}}, None)
        else:
            paths[role] = save(tmp_path / f"{role}.safetensors", tensors)
    patch = tmp_path / "p.nnpatch"
    result = nnpatch.diff(paths["base"], paths["target"], patch)
    assert {c.name: c.op for c in result.changes} == {"layer.weight": "rows", "emb": "elements", "step": "whole"}
    out = tmp_path / f"out.{'bin' if target_kind == 'bin' else 'safetensors'}"
    nnpatch.apply(paths["base"], patch, out, verify="full")
    # the same kind of file comes back: byte-identical safetensors, or a torch file with the same tensors
    assert sniff(out) == ("pytorch" if target_kind == "bin" else "safetensors")
    assert _model_digest(out) == _model_digest(paths["target"])
    if target_kind == "safetensors":
        assert read(out) == read(paths["target"])
    # the same patch applies to the base in any other format with the same tensors
    other = save(tmp_path / "base-as-safetensors.safetensors", old, {"x": "y"})
    out2 = out.with_name("out2" + out.suffix)
    nnpatch.apply(other, patch, out2)
    assert _model_digest(out2) == _model_digest(out)
    assert nnpatch.verify(patch, base=paths["base"], target=out).ok
    assert nnpatch.verify(patch, base=other).ok
    assert nnpatch.verify(patch, target=paths["target"]).ok


def test_wrong_base_in_another_format_is_refused(tmp_path):
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(save(tmp_path / "a.safetensors", _tensors(0, False)), save(tmp_path / "b.safetensors",
                                                                            _tensors(0, True)), patch)
    wrong = tmp_path / "wrong.bin"
    _torch_save(wrong, _tensors(1, False))
    with pytest.raises(nnpatch.BaseMismatchError):
        nnpatch.apply(wrong, patch, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
