"""Model directories as targets (format 1.1): shards rebuilt, other files carried or copied,
the whole directory committed atomically, exact byte for byte and by the directory digest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnpatch
from nnpatch.errors import BaseMismatchError, IntegrityError, PatchFormatError, UsageError
from crafting import header_json, with_header
from nnpatch.patchfile import read_patch
from nnpatch.weights.sharded import shard_name, write_sharded
from nnpatch.weights import open_model
from nnpatch.weights.source import open_source

from .conftest import read
from conftest import assert_proven


def contents(d) -> dict[str, bytes]:
    d = str(d)
    return {os.path.relpath(os.path.join(r, f), d): read(os.path.join(r, f)) for r, _, files in os.walk(d)
            for f in files}


def dir_digest(d) -> str:
    with open_source(str(d)) as s:
        return s.file_digest()


def tensors(seed: int, n: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    out = {f"layer{i}.weight": ("F32", (8, 6), rng.standard_normal(48).astype("<f4").tobytes()) for i in range(n)}
    out["embed"] = ("BF16", (16, 4), rng.integers(0, 1 << 16, 64, dtype="<u2").tobytes())
    return out


def change_rows(t: dict, name: str, rows) -> dict:
    dtype, shape, data = t[name]
    arr = np.frombuffer(data, "<u4").reshape(shape[0], -1).copy()
    arr[list(rows)] ^= 0x5
    return dict(t, **{name: (dtype, shape, arr.tobytes())})


def write_model(d, t: dict, shards: int, files: dict[str, bytes]) -> None:
    names = sorted(t)
    per = -(-len(names) // shards)
    write_sharded(d, {shard_name(i + 1, shards): {n: t[n] for n in names[i * per:(i + 1) * per]}
                      for i in range(shards)}, shard_metadata={"format": "pt"})
    for rel, data in files.items():
        p = os.path.join(str(d), rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


TOKENIZER = json.dumps({"vocab": {f"t{i}": i for i in range(300)}}).encode()


@pytest.fixture
def pair(tmp_path):
    """v1: 2 shards, config, tokenizer, a README; v2: 3 shards (tensors moved), one tensor's rows
    changed, one added, config changed, tokenizer unchanged, README removed, a new nested file."""
    t1 = tensors(0)
    t2 = change_rows(t1, "layer2.weight", [1, 5])
    t2["head.bias"] = ("F32", (8,), np.arange(8, dtype="<f4").tobytes())
    a, b = tmp_path / "v1", tmp_path / "v2"
    write_model(a, t1, 2, {"config.json": b'{"v": 1}\n', "tokenizer.json": TOKENIZER, "README.md": b"# v1\n"})
    write_model(b, t2, 3, {"config.json": b'{"v": 2}\n', "tokenizer.json": TOKENIZER,
                           "extra/generation_config.json": b"{}\n"})
    return a, b


def test_patch_makes_a_directory_with_every_kind_of_file(pair, tmp_path):
    a, b = pair
    r = nnpatch.diff(a, b, tmp_path / "p.nnpatch", aligned=True)  # the version of the target alone
    with read_patch(tmp_path / "p.nnpatch") as p:
        h = p.header
        # 1.1 for the target format, 1.2 where a section also uses esort: the lowest that has both
        assert h.version == h.min_version == ((1, 2) if any(op.values is not None and "esort" in op.values.codec
                                                            for op in h.ops) else (1, 1))
        assert h.target.format == "safetensors-dir"
        kinds = {f.path: f.kind for f in h.target.files}
        assert kinds == {"config.json": "blob", "extra/generation_config.json": "blob",
                         "model-00001-of-00003.safetensors": "safetensors",
                         "model-00002-of-00003.safetensors": "safetensors",
                         "model-00003-of-00003.safetensors": "safetensors",
                         "model.safetensors.index.json": "blob", "tokenizer.json": "copy"}
        assert h.target.blake3 == dir_digest(b) and h.target.size == sum(len(v) for v in contents(b).values())
        assert {op.name: op.kind for op in h.ops} == {"head.bias": "add", "layer2.weight": "rows"}
    data = (tmp_path / "p.nnpatch").read_bytes()
    assert r.patch_size == len(data) and TOKENIZER[:64] not in data  # the unchanged file is not carried


@pytest.mark.parametrize("verify", ["default", "full", "touched"])
def test_directory_round_trip_is_exact(pair, tmp_path, verify, backend):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    before = contents(a)
    out = tmp_path / "out"
    r = nnpatch.apply(a, tmp_path / "p.nnpatch", out, verify=verify)
    assert contents(out) == contents(b)
    assert dir_digest(out) == dir_digest(b)
    assert_proven(r, b, verify, file_digest=dir_digest(b))
    assert contents(a) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "p.nnpatch", "v1", "v2"]  # no temporary directory left
    rep = nnpatch.verify(tmp_path / "p.nnpatch", base=a, target=out)
    assert rep.ok, [c.detail for c in rep.failures()]


def test_single_file_base_to_directory_carries_every_other_file(pair, tmp_path):
    a, b = pair
    single = tmp_path / "v1.safetensors"
    nnpatch.weights.write_safetensors(single, tensors(0))
    nnpatch.diff(single, b, tmp_path / "p.nnpatch")
    with read_patch(tmp_path / "p.nnpatch") as p:
        assert "copy" not in {f.kind for f in p.header.target.files}
    nnpatch.apply(single, tmp_path / "p.nnpatch", tmp_path / "out")
    assert contents(tmp_path / "out") == contents(b)


def test_resharded_base_still_takes_the_patch(pair, tmp_path):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    other = tmp_path / "v1-resharded"
    write_model(other, tensors(0), 4, {"tokenizer.json": TOKENIZER})
    nnpatch.apply(other, tmp_path / "p.nnpatch", tmp_path / "out")
    assert contents(tmp_path / "out") == contents(b)


def test_copy_from_a_changed_base_file_is_refused(pair, tmp_path):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    (a / "tokenizer.json").write_bytes(TOKENIZER.replace(b"t1", b"x1"))
    with pytest.raises(BaseMismatchError, match="tokenizer.json"):
        nnpatch.apply(a, tmp_path / "p.nnpatch", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if "nnpatch-tmp" in n]
    (a / "tokenizer.json").unlink()
    with pytest.raises(BaseMismatchError, match="missing"):
        nnpatch.apply(a, tmp_path / "p.nnpatch", tmp_path / "out")


def test_wrong_tensors_in_a_directory_base_are_refused(pair, tmp_path):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    bad = tmp_path / "bad"
    write_model(bad, change_rows(tensors(0), "layer5.weight", [0]), 2, {"tokenizer.json": TOKENIZER})
    with pytest.raises(BaseMismatchError):
        nnpatch.apply(bad, tmp_path / "p.nnpatch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_must_be_new_or_empty(pair, tmp_path):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_bytes(b"mine")
    with pytest.raises(UsageError, match="not empty"):
        nnpatch.apply(a, tmp_path / "p.nnpatch", tmp_path / "busy")
    assert contents(tmp_path / "busy") == {"keep.txt": b"mine"}
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a directory"):
        nnpatch.apply(a, tmp_path / "p.nnpatch", tmp_path / "file")
    (tmp_path / "empty").mkdir()
    nnpatch.apply(a, tmp_path / "p.nnpatch", tmp_path / "empty")
    assert contents(tmp_path / "empty") == contents(b)


def test_failure_mid_build_leaves_nothing(pair, tmp_path, monkeypatch):
    from nnpatch.applier import directory

    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(directory, "_write_copy", boom)
    with pytest.raises(nnpatch.NnpatchIOError, match="No space left"):
        nnpatch.apply(a, tmp_path / "p.nnpatch", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["p.nnpatch", "v1", "v2"]


@pytest.mark.parametrize("exchange_works", [True, False])
def test_in_place_update_of_a_directory(pair, tmp_path, monkeypatch, exchange_works):
    from nnpatch.applier import directory

    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    (a / ".git").mkdir()
    (a / ".git" / "HEAD").write_bytes(b"ref: main\n")
    if not exchange_works:
        monkeypatch.setattr(directory, "exchange", lambda x, y: False)
    r = nnpatch.apply_in_place(a, tmp_path / "p.nnpatch")
    assert r.output == str(a)
    got = contents(a)
    assert got.pop(os.path.join(".git", "HEAD")) == b"ref: main\n"  # not part of the model: kept
    assert got == contents(b)
    assert sorted(os.listdir(tmp_path)) == ["p.nnpatch", "v1", "v2"]


def test_in_place_refuses_a_kind_change(pair, tmp_path):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    single = tmp_path / "m.safetensors"
    nnpatch.weights.write_safetensors(single, tensors(0))
    with pytest.raises(UsageError, match="model directory"):
        nnpatch.apply_in_place(single, tmp_path / "p.nnpatch")


def test_chain_resolves_copies_through_earlier_links(tmp_path):
    t1 = tensors(1)
    t2 = change_rows(t1, "layer1.weight", [0])
    t3 = change_rows(t2, "layer4.weight", [3, 4])
    write_model(tmp_path / "v1", t1, 2, {"config.json": b"1", "tokenizer.json": TOKENIZER})
    write_model(tmp_path / "v2", t2, 2, {"config.json": b"2", "tokenizer.json": TOKENIZER})
    write_model(tmp_path / "v3", t3, 3, {"config.json": b"2", "tokenizer.json": TOKENIZER})
    nnpatch.diff(tmp_path / "v1", tmp_path / "v2", tmp_path / "p12")
    nnpatch.diff(tmp_path / "v2", tmp_path / "v3", tmp_path / "p23")
    with read_patch(tmp_path / "p23") as p:  # config.json is a copy in link 2, a blob in link 1
        assert {f.path: f.kind for f in p.header.target.files}["config.json"] == "copy"
    r = nnpatch.apply_chain(tmp_path / "v1", [tmp_path / "p12", tmp_path / "p23"], tmp_path / "out",
                            verify="full")
    assert contents(tmp_path / "out") == contents(tmp_path / "v3")
    assert r.blake3 == dir_digest(tmp_path / "v3") and r.links == 2


def test_blob_that_lies_about_its_digest_is_caught_by_verify(pair, tmp_path):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    data = (tmp_path / "p.nnpatch").read_bytes()
    obj = header_json(data)
    f = next(f for f in obj["target"]["files"] if f["path"] == "config.json")
    f["blake3"] = "0" * 64
    (tmp_path / "bad.nnpatch").write_bytes(with_header(data, obj))
    with pytest.raises(PatchFormatError, match="config.json"):
        nnpatch.verify(tmp_path / "bad.nnpatch")
    with pytest.raises(IntegrityError, match="config.json"):
        nnpatch.apply(a, tmp_path / "bad.nnpatch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, error", [
    (lambda h: h["target"]["files"][0].update(path="../evil"), "component"),
    (lambda h: h["target"]["files"][0].update(path="/etc/passwd"), "relative path"),
    (lambda h: h["target"]["files"].append(dict(h["target"]["files"][-1])), "sorted"),
    (lambda h: h["target"].update(layout=h["target"]["files"][2]["layout"]), "not 'layout'"),
    (lambda h: h["target"].update(size=h["target"]["size"] + 1), "sum of its files"),
    (lambda h: h["target"]["files"][0].update(**{"from": "x"}), "has no 'from'"),
    (lambda h: h["base"].update(files=[]), "only a directory target"),
])
def test_hostile_directory_headers_are_refused(pair, tmp_path, edit, error):
    a, b = pair
    nnpatch.diff(a, b, tmp_path / "p.nnpatch")
    data = (tmp_path / "p.nnpatch").read_bytes()
    obj = header_json(data)
    edit(obj)
    (tmp_path / "bad.nnpatch").write_bytes(with_header(data, obj))
    with pytest.raises(PatchFormatError, match=error):
        nnpatch.apply(a, tmp_path / "bad.nnpatch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_applies_verifies_and_shows_a_directory_patch(pair, tmp_path):
    a, b = pair
    run = [sys.executable, "-m", "nnpatch"]
    p = subprocess.run(run + ["diff", str(a), str(b), "-o", str(tmp_path / "p.nnpatch")], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(run + ["apply", str(a), str(tmp_path / "p.nnpatch"), "-o", str(tmp_path / "out"),
                              "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with nnpatch.read_patch(tmp_path / "p.nnpatch") as patch:
        assert json.loads(p.stdout)["blake3"] == patch.header.target.blake3  # every mode proves it
    with open_model(b) as m:
        assert json.loads(p.stdout)["model_blake3"] == m.digest().hex()
    assert contents(tmp_path / "out") == contents(b)
    p = subprocess.run(run + ["verify", str(tmp_path / "p.nnpatch"), "--base", str(a), "--target",
                              str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "directory BLAKE3 matches" in p.stdout
    p = subprocess.run(run + ["show", str(tmp_path / "p.nnpatch")], capture_output=True, text=True)
    assert p.returncode == 0 and "tokenizer.json" in p.stdout and "copy" in p.stdout
    p = subprocess.run(run + ["apply", str(a), str(tmp_path / "p.nnpatch"), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "not empty" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    shutil.rmtree(tmp_path / "out")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_directories_round_trip(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("rand")
    n = data.draw(st.integers(1, 9))
    t1 = tensors(data.draw(st.integers(0, 1000)), n)
    t2 = dict(t1)
    for name in data.draw(st.lists(st.sampled_from(sorted(t1)), max_size=3, unique=True)):
        if name.startswith("layer"):
            t2 = change_rows(t2, name, data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True)))
    if data.draw(st.booleans()) and len(t2) > 1:
        del t2[sorted(t2)[0]]
    files1 = {"config.json": data.draw(st.binary(max_size=64))}
    files2 = {"config.json": data.draw(st.sampled_from([files1["config.json"], b"{}"]))}
    if data.draw(st.booleans()):
        files2["sub/merges.txt"] = data.draw(st.binary(max_size=300))
    write_model(tmp / "a", t1, data.draw(st.integers(1, 3)), files1)
    write_model(tmp / "b", t2, data.draw(st.integers(1, 3)), files2)
    nnpatch.diff(tmp / "a", tmp / "b", tmp / "p")
    nnpatch.apply(tmp / "a", tmp / "p", tmp / "out", verify="full")
    assert contents(tmp / "out") == contents(tmp / "b")
    assert dir_digest(tmp / "out") == dir_digest(tmp / "b")
