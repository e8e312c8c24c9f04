"""Release sets: a patch from every old version to the new one, a manifest, and an
updater that checks everything before it replaces the model."""

from __future__ import annotations

import json
import os
import shutil

import jsonschema
import numpy as np
import pytest

from nnpatch.delivery.manifest import parse_manifest
from nnpatch.delivery.trust import load_manifest
from nnpatch.delivery.updater import update
from nnpatch.errors import IntegrityError, NnpatchIOError, NoPatchError, PatchFormatError, UsageError
from nnpatch.hashing import hash_file
from nnpatch.release import make_release
from nnpatch.weights import write_safetensors

from .conftest import float_like

SCHEMA = os.path.join(os.path.dirname(__file__), os.pardir, "spec", "json", "release-manifest.schema.json")


def _versions(d, n=4, seed=0):
    """v1..vn: each changes a few rows of a few tensors of the one before."""
    rng = np.random.default_rng(seed)
    t = {f"layer.{i}.weight": ("F32", (64, 32), float_like(rng, "F32", (64, 32))) for i in range(4)}
    t["emb"] = ("BF16", (100, 16), float_like(rng, "BF16", (100, 16)))
    paths = []
    for v in range(1, n + 1):
        if v > 1:
            for name in ("layer.0.weight", f"layer.{v % 4}.weight"):
                a = np.frombuffer(t[name][2], np.float32).reshape(64, 32).copy()
                rows = rng.choice(64, 6, replace=False)
                a[rows] += rng.standard_normal((6, 32)).astype(np.float32) * 0.01
                t[name] = ("F32", (64, 32), a.tobytes())
        p = os.path.join(d, f"v{v}.safetensors")
        write_safetensors(p, t)
        paths.append(p)
    return paths


def _schema_check(manifest):
    with open(SCHEMA, encoding="utf-8") as f:
        jsonschema.Draft202012Validator(json.load(f)).validate(manifest)


@pytest.fixture
def release(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = _versions(src)
    dist = tmp_path / "dist"
    manifest = make_release(paths[:-1], paths[-1], dist, chain="always")
    return tmp_path, paths, dist, manifest


def test_manifest_describes_every_patch(release):
    tmp, paths, dist, m = release
    _schema_check(m)
    assert json.loads((dist / "manifest.json").read_text()) == m == load_manifest(dist / "manifest.json")
    assert m["target"]["blake3"] == hash_file(paths[-1]) and m["target"]["size"] == os.path.getsize(paths[-1])
    assert m["target"]["name"] == "v4"
    assert [b["patch"] for b in m["bases"]] == ["v1-to-v4.nnpatch", "v2-to-v4.nnpatch", "v3-to-v4.nnpatch"]
    for b, p in zip(m["bases"], paths):
        assert b["base_blake3"] == hash_file(p) and b["base_size"] == os.path.getsize(p)
        assert b["patch_size"] == os.path.getsize(dist / b["patch"])
        assert b["patch_blake3"] == hash_file(dist / b["patch"])
    # chain=always: v1 and v2 have chains through the consecutive patches; v3's direct patch is its chain
    assert [link["patch"] for link in m["bases"][0]["chain"]["links"]] == [
        "v1-to-v2.nnpatch", "v2-to-v3.nnpatch", "v3-to-v4.nnpatch"]
    assert "chain" not in m["bases"][2]
    assert m["bases"][0]["chain"]["size"] == sum(os.path.getsize(dist / x["patch"])
                                                 for x in m["bases"][0]["chain"]["links"])
    assert sorted(os.listdir(dist)) == ["manifest.json", "v1-to-v2.nnpatch", "v1-to-v4.nnpatch",
                                        "v2-to-v3.nnpatch", "v2-to-v4.nnpatch", "v3-to-v4.nnpatch"]


def test_auto_chain_keeps_only_smaller_chains(tmp_path):
    paths = _versions(tmp_path)
    m = make_release(paths[:-1], paths[-1], tmp_path / "dist")
    _schema_check(m)
    for b in m["bases"]:
        if "chain" in b:
            assert b["chain"]["size"] < b["patch_size"]
    used = {x["patch"] for b in m["bases"] for x in b.get("chain", {}).get("links", [])}
    assert set(os.listdir(tmp_path / "dist")) == {"manifest.json"} | {b["patch"] for b in m["bases"]} | used
    m2 = make_release(paths[:-1], paths[-1], tmp_path / "dist2", chain="never")
    assert all("chain" not in b for b in m2["bases"])


@pytest.mark.parametrize("prefer", ["direct", "chain", "smallest"])
def test_update_brings_every_old_version_to_the_target(release, prefer):
    tmp, paths, dist, m = release
    for i, p in enumerate(paths[:-1]):
        model = tmp / f"device{i}" / "model.safetensors"
        model.parent.mkdir()
        shutil.copyfile(p, model)
        r = update(model, dist / "manifest.json", prefer=prefer)
        assert r.updated and r.to_blake3 == m["target"]["blake3"] and r.from_blake3 == hash_file(p)
        assert hash_file(model) == hash_file(paths[-1])
        assert os.listdir(model.parent) == ["model.safetensors"]  # no temporary left
        if prefer == "chain" and i < 2:
            assert len(r.patches) == 3 - i
        else:
            assert len(r.patches) == 1 or prefer == "smallest"
        again = update(model, dist / "manifest.json")
        assert not again.updated and again.patches == []


def test_update_refuses_an_unknown_version(release):
    tmp, paths, dist, m = release
    other = tmp / "other.safetensors"
    write_safetensors(other, {"x": ("F32", (2,), b"\0" * 8)})
    with pytest.raises(NoPatchError, match=r"no patch for this model version \(BLAKE3 [0-9a-f]{64}\)"):
        update(other, dist / "manifest.json")


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "swap"])
def test_update_checks_the_patch_before_applying(release, damage):
    tmp, paths, dist, m = release
    model = tmp / "model.safetensors"
    shutil.copyfile(paths[0], model)
    before = model.read_bytes()
    patch = dist / m["bases"][0]["patch"]
    if damage == "flip":
        data = bytearray(patch.read_bytes())
        data[len(data) // 2] ^= 1
        patch.write_bytes(bytes(data))
    elif damage == "truncate":
        patch.write_bytes(patch.read_bytes()[:-10])
    elif damage == "missing":
        os.unlink(patch)
    else:  # another valid patch under this name: size and hash differ from the manifest's
        shutil.copyfile(dist / m["bases"][1]["patch"], patch)
    with pytest.raises(NnpatchIOError if damage == "missing" else IntegrityError,
                       match="truncated|BLAKE3|bytes|cannot read"):
        update(model, dist / "manifest.json")
    assert model.read_bytes() == before
    assert sorted(os.listdir(tmp)) == sorted(["src", "dist", "model.safetensors"])


def test_manifest_validation(release):
    tmp, paths, dist, m = release
    raw = (dist / "manifest.json").read_bytes()
    assert parse_manifest(raw) == m
    for bad, match in [
        (b"[]", "invalid manifest: not a JSON object"),
        (b'{"format": "other"}', "not an nnpatch release manifest"),
        (b"\xff", "invalid manifest JSON"),
        (json.dumps(dict(m, version=2)).encode(), "unsupported manifest version"),
        (json.dumps(dict(m, target=dict(m["target"], blake3="XYZ"))).encode(), "hex"),
        (json.dumps(dict(m, bases=[dict(m["bases"][0], patch="../../etc/passwd")])).encode(), "plain file name"),
        (json.dumps(dict(m, bases=[dict(m["bases"][0], patch_size=-1)])).encode(), "negative"),
        (json.dumps(dict(m, bases=[dict(m["bases"][0], chain={"size": 1, "links": []})])).encode(), "no links"),
    ]:
        with pytest.raises(PatchFormatError, match=match):
            parse_manifest(bad)


def test_release_names_come_from_folders_then_hashes(tmp_path):
    """The CI layout old/model.safetensors, new/model.safetensors is named by its folders; names
    that neither stems nor folders keep apart fall back to hash prefixes; --name wins."""
    paths = _versions(tmp_path, n=3)
    for d in ("old", "mid", "new"):
        (tmp_path / d).mkdir()
    for d, p in zip(("old", "mid", "new"), paths):
        shutil.copyfile(p, tmp_path / d / "model.safetensors")
    m = make_release([tmp_path / "old" / "model.safetensors", tmp_path / "mid" / "model.safetensors"],
                     tmp_path / "new" / "model.safetensors", tmp_path / "dist", chain="never")
    assert [b["name"] for b in m["bases"]] == ["old", "mid"] and m["target"]["name"] == "new"
    assert [b["patch"] for b in m["bases"]] == ["old-to-new.nnpatch", "mid-to-new.nnpatch"]
    # same stem, same folder name: hash prefixes
    a, b = tmp_path / "x" / "m", tmp_path / "y" / "m"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    shutil.copyfile(paths[0], a / "model.safetensors")
    shutil.copyfile(paths[1], b / "model.safetensors")
    m = make_release([a / "model.safetensors", b / "model.safetensors", paths[2]], paths[2], tmp_path / "dist2",
                     chain="never")
    assert len(m["bases"]) == 2  # the target itself is skipped
    for entry in m["bases"]:
        assert entry["patch"] == f"{entry['base_blake3'][:16]}-to-{m['target']['name']}.nnpatch"
        assert entry["name"] == entry["base_blake3"][:16]
    # --name
    m = make_release([a / "model.safetensors", b / "model.safetensors"], paths[2], tmp_path / "dist3", chain="never",
                     names={str(a / "model.safetensors"): "1.0", str(b / "model.safetensors"): "1.1"})
    assert [e["name"] for e in m["bases"]] == ["1.0", "1.1"] and m["target"]["name"] == "v3"
    for names, match in [({str(paths[0]): "../x"}, "a name is"), ({str(tmp_path / "nope"): "x"}, "not one of"),
                         ({str(a / "model.safetensors"): "z", str(b / "model.safetensors"): "z"}, "same name")]:
        with pytest.raises(UsageError, match=match):
            make_release([a / "model.safetensors", b / "model.safetensors"], paths[2], tmp_path / "d4", names=names)
    with pytest.raises(UsageError):
        make_release([], paths[2], tmp_path / "x")


# --- model directories as versions ---------------------------------------------------------------

def _dir_versions(root):
    """v1..v3 as Hugging Face model directories: rows change, shards move, config changes."""
    from .test_directory_target import TOKENIZER, change_rows, tensors, write_model

    t1 = tensors(0)
    t2 = change_rows(t1, "layer2.weight", [1, 5])
    t3 = change_rows(t2, "layer4.weight", [0])
    paths = []
    for i, (t, shards) in enumerate(((t1, 2), (t2, 2), (t3, 3)), 1):
        d = root / f"v{i}"
        write_model(d, t, shards, {"config.json": b'{"v": %d}\n' % i, "tokenizer.json": TOKENIZER})
        paths.append(d)
    return paths


def test_release_and_update_of_model_directories(tmp_path):
    from .test_directory_target import contents, dir_digest

    v1, v2, v3 = _dir_versions(tmp_path)
    dist = tmp_path / "dist"
    m = make_release([v1, v2], v3, dist, chain="always")
    _schema_check(m)
    assert m["target"]["blake3"] == dir_digest(v3)
    assert [b["base_blake3"] for b in m["bases"]] == [dir_digest(v1), dir_digest(v2)]
    assert m["bases"][0]["base_size"] == sum(len(b) for b in contents(v1).values())
    for prefer in ("direct", "chain"):
        local = tmp_path / f"local-{prefer}"
        shutil.copytree(v1, local)
        (local / ".git").mkdir()  # kept across the swap, as apply --in-place keeps it
        (local / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        r = update(local, dist / "manifest.json", prefer=prefer)
        assert r.updated and r.from_blake3 == dir_digest(v1) and r.to_blake3 == dir_digest(v3)
        got = contents(local)
        assert got.pop(os.path.join(".git", "HEAD")) == b"ref: refs/heads/main\n"
        assert got == contents(v3)
        assert update(local, dist / "manifest.json").updated is False


def test_directory_update_with_a_corrupt_patch_leaves_the_model(tmp_path):
    from .test_directory_target import contents

    v1, v2, v3 = _dir_versions(tmp_path)
    dist = tmp_path / "dist"
    m = make_release([v1], v3, dist, chain="never")
    local = tmp_path / "local"
    shutil.copytree(v1, local)
    before = contents(local)
    patch = dist / m["bases"][0]["patch"]
    data = bytearray(patch.read_bytes())
    data[-40] ^= 1
    patch.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        update(local, dist / "manifest.json")
    assert contents(local) == before
    assert sorted(os.listdir(tmp_path)) == ["dist", "local", "v1", "v2", "v3"]  # no temporary directory left


def test_release_cli_takes_directories(tmp_path):
    from click.testing import CliRunner

    from nnpatch.cli import cli

    from .test_directory_target import contents

    v1, v2, v3 = _dir_versions(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["release", str(v1), str(v2), "--to", str(v3), "-o", str(tmp_path / "dist")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["update", str(v1), "--manifest", str(tmp_path / "dist" / "manifest.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["updated"] is True
    assert contents(v1) == contents(v3)
    r = runner.invoke(cli, ["release", str(tmp_path / "missing"), "--to", str(v3), "-o", str(tmp_path / "d2")])
    assert r.exit_code == 2 and "not a file or model directory" in r.output


def test_long_version_names_make_patch_names_an_updater_takes(tmp_path):
    """Two long stems once made a patch name over the 200 characters a manifest's `patch` may have:
    the release was written and every updater refused it. Names are at most 94 characters now, a
    longer stem falls back to the next rule, and the release updates as published."""
    paths = _versions(tmp_path, n=2)
    long_old, long_new = tmp_path / ("o" * 99 + ".safetensors"), tmp_path / ("n" * 99 + ".safetensors")
    shutil.copyfile(paths[0], long_old)
    shutil.copyfile(paths[1], long_new)
    m = make_release([long_old], long_new, tmp_path / "dist", chain="never")
    assert all(len(b["patch"]) <= 200 for b in m["bases"])
    load_manifest(tmp_path / "dist" / "manifest.json")
    model = tmp_path / "device.safetensors"
    shutil.copyfile(long_old, model)
    assert update(model, tmp_path / "dist" / "manifest.json").updated
    assert hash_file(model) == hash_file(long_new)
    with pytest.raises(UsageError, match="1 to 94"):
        make_release([long_old], long_new, tmp_path / "d2", names={str(long_old): "x" * 95})


def test_the_updaters_names_still_import_from_release():
    """nnpatch.release was the updater's home before nnpatch.delivery; docs/WORKFLOWS.md imports
    ``update`` from there, so its public names stay importable from it."""
    import nnpatch.delivery.updater as updater
    import nnpatch.release as release

    assert release.update is updater.update and release.UpdateResult is updater.UpdateResult
    assert release.load_manifest is load_manifest and release.parse_manifest is parse_manifest
    assert release.partial_path is updater.partial_path


def test_a_signed_chain_update_reads_the_key_file_once(tmp_path, monkeypatch):
    """The manifest and every link of a chain are checked against one TrustedKey, parsed once."""
    pytest.importorskip("cryptography")
    from nnpatch import signing

    signing.generate_keypair(str(tmp_path / "k.pem"), str(tmp_path / "k.pub.pem"))
    paths = _versions(tmp_path)
    make_release(paths[:-1], paths[-1], tmp_path / "dist", chain="always", sign_key=tmp_path / "k.pem", release=1)
    model = tmp_path / "device" / "model.safetensors"
    model.parent.mkdir()
    shutil.copyfile(paths[0], model)
    reads = []
    real = signing.TrustedKey.from_pem
    monkeypatch.setattr(signing.TrustedKey, "from_pem",
                        classmethod(lambda cls, data, **kw: reads.append(1) or real(data, **kw)))
    for in_place in (False, True):
        shutil.copyfile(paths[0], model)
        (model.parent / "model.safetensors.nnpatch-state").unlink(missing_ok=True)
        reads.clear()
        r = update(model, tmp_path / "dist" / "manifest.json", prefer="chain", key=tmp_path / "k.pub.pem",
                   in_place=in_place)
        assert len(r.patches) == 3 and hash_file(model) == hash_file(paths[-1]) and r.key_id
        assert len(reads) == 1


def test_an_aligned_release_is_for_appliers_of_format_1_4(tmp_path):
    """release --aligned: every patch in the 1.4 layout (no packed-sections), which nnpatch 0.4 reads; the
    default release packs them (1.5). Both bring a device to the target exactly."""
    from click.testing import CliRunner

    from nnpatch import read_patch
    from nnpatch.cli import cli

    paths = _versions(tmp_path)
    for flag in (["--aligned"], []):
        dist = tmp_path / f"dist{len(flag)}"
        args = ["release", *map(str, paths[:-1]), "--to", str(paths[-1]), "-o", str(dist), "--chain", "always", *flag]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        found = set()
        for name in sorted(n for n in os.listdir(dist) if n.endswith(".nnpatch")):
            with read_patch(dist / name) as p:
                found.add(p.header.version)
                assert p.header.packed is not bool(flag)
        assert all(v < (1, 5) for v in found) if flag else found == {(1, 5)}, found
        model = tmp_path / f"device{len(flag)}" / "model.safetensors"
        model.parent.mkdir()
        shutil.copyfile(paths[0], model)
        assert update(model, dist / "manifest.json").updated
        assert hash_file(model) == hash_file(paths[-1])
