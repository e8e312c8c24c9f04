"""The command line: exit codes, one-line errors, nothing damaged on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nnpatch.cli import cli
from nnpatch.hashing import hash_file
from crafting import header_json

from .conftest import read, save


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def made(tmp_path, pair, runner):
    base, target = pair()
    patch = str(tmp_path / "p.nnpatch")
    r = runner.invoke(cli, ["diff", base, target, "-o", patch])
    assert r.exit_code == 0, r.output
    return base, target, patch


def _one_line_error(r, code):
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_diff_prints_stat(made, runner, tmp_path):
    base, target, _ = made
    r = runner.invoke(cli, ["diff", base, target, "-o", str(tmp_path / "q.nnpatch"), "--stat"])
    assert "tensors changed (2 added, 1 removed)" in r.stdout
    assert "conv.weight" in r.stdout and "|" in r.stdout
    # the default is a two-line summary (tests/test_cli_promises.py pins it)
    r = runner.invoke(cli, ["diff", base, target, "-o", str(tmp_path / "q.nnpatch")])
    assert "tensors changed (2 added, 1 removed)" in r.stdout and len(r.stdout.splitlines()) == 2


def test_apply_then_hash_check(made, runner, tmp_path, monkeypatch):
    base, target, patch = made
    out = str(tmp_path / "out.safetensors")
    r = runner.invoke(cli, ["apply", base, patch, "-o", out])
    assert r.exit_code == 0, r.output
    assert read(out) == read(target) and hash_file(out) == hash_file(target)
    sums = tmp_path / "SUMS"
    r = runner.invoke(cli, ["hash", target])
    sums.write_text(r.stdout.replace(target, os.path.basename(out)))
    monkeypatch.chdir(tmp_path)  # names are relative to the current directory, as for b3sum -c
    r = runner.invoke(cli, ["hash", "--check", str(sums)])
    assert r.exit_code == 0 and r.stdout.strip().endswith(": OK")


def test_hash_output_is_b3sum_compatible(made, runner, tmp_path):
    base, _, _ = made
    r = runner.invoke(cli, ["hash", base])
    assert r.stdout == f"{hash_file(base)}  {base}\n"
    if shutil.which("b3sum"):
        (tmp_path / "SUMS").write_text(r.stdout)
        assert subprocess.run(["b3sum", "-c", str(tmp_path / "SUMS")], capture_output=True).returncode == 0
        expected = subprocess.run(["b3sum", base], capture_output=True, text=True).stdout
        assert expected == r.stdout


def test_hash_check_mismatch_exits_1(made, runner, tmp_path):
    base, target, _ = made
    sums = tmp_path / "SUMS"
    sums.write_text(f"{hash_file(target)}  {base}\n")
    r = runner.invoke(cli, ["hash", "--check", str(sums)])
    assert r.exit_code == 1
    assert r.stdout.strip() == f"{base}: FAILED"


def test_hash_check_malformed_manifest_exits_3(runner, tmp_path):
    sums = tmp_path / "SUMS"
    sums.write_text("not a manifest\n")
    line = _one_line_error(runner.invoke(cli, ["hash", "--check", str(sums)]), 3)
    assert line == f"Error: {sums}: line 1: not a b3sum line (expected '<64 hex digits>  <path>')"


def test_hash_tensors_and_model_digest(made, runner):
    base, _, _ = made
    r = runner.invoke(cli, ["hash", "--tensors", "--json", base])
    obj = json.loads(r.stdout)
    entry = obj["files"][0]
    assert entry["blake3"] == hash_file(base)
    assert len(entry["model_blake3"]) == 64
    assert {t["name"] for t in entry["tensors"]} >= {"conv.weight", "emb"}


def test_wrong_base_exits_4_and_writes_nothing(made, runner, tmp_path):
    _, target, patch = made
    out = tmp_path / "out.safetensors"
    before = read(target)
    line = _one_line_error(runner.invoke(cli, ["apply", target, patch, "-o", str(out)]), 4)
    assert "wrong base" in line
    assert not out.exists()
    assert read(target) == before
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_wrong_base_with_same_tensor_names_exits_4(made, runner, tmp_path):
    base, _, patch = made
    from nnpatch.weights import SafetensorsFile

    with SafetensorsFile(base) as f:
        tensors = {n: (i.dtype, i.shape, bytearray(f.raw(n).tobytes())) for n, i in f.tensors.items()}
    tensors["same"][2][0] ^= 1  # an unchanged tensor differs: caught by the model digest
    other = save(tmp_path / "other.safetensors", {k: (d, s, bytes(b)) for k, (d, s, b) in tensors.items()})
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    line = _one_line_error(runner.invoke(cli, ["apply", other, patch, "-o", str(out)]), 4)
    assert "tensor contents differ" in line
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_patch_exits_3(made, runner, tmp_path, damage):
    base, _, patch = made
    data = bytearray(read(patch))
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) // 2]
    bad = tmp_path / "bad.nnpatch"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    base_before = hash_file(base)
    line = _one_line_error(runner.invoke(cli, ["apply", base, str(bad), "-o", str(out)]), 3)
    assert str(bad) in line
    assert not out.exists() and hash_file(base) == base_before


def test_missing_file_exits_5(runner, tmp_path, made):
    base, _, _ = made
    line = _one_line_error(runner.invoke(cli, ["apply", base, str(tmp_path / "nope"), "-o", str(tmp_path / "o")]), 5)
    assert "nope" in line and "No such file" in line


def test_not_a_model_exits_3(runner, tmp_path, made):
    _, _, patch = made
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    line = _one_line_error(runner.invoke(cli, ["apply", str(junk), patch, "-o", str(tmp_path / "o")]), 3)
    assert line == (f"Error: {junk}: not a model nnpatch can read (safetensors, PyTorch checkpoint, ONNX, GGUF, "
                    "TFLite, ExecuTorch .ptd, or a Hugging Face model directory)")


def test_usage_error_exits_2(runner):
    assert runner.invoke(cli, ["diff", "a"]).exit_code == 2
    assert runner.invoke(cli, ["hash"]).exit_code == 2


def test_verify(made, runner, tmp_path):
    base, target, patch = made
    r = runner.invoke(cli, ["verify", patch, "--base", base, "--target", target])
    assert r.exit_code == 0, r.output
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == ["patch", "base", "target"]
    r = runner.invoke(cli, ["verify", patch, "--base", target, "--json"])
    assert r.exit_code == 1
    obj = json.loads(r.stdout)
    assert obj["ok"] is False and [c["ok"] for c in obj["checks"]] == [True, False]


def test_show(made, runner):
    _, _, patch = made
    r = runner.invoke(cli, ["show", patch])
    # the lowest version with the features used: 1.5 for packed sections, else 1.2 where a section
    # orders values by exponent (esort)
    with open(patch, "rb") as f:
        header = header_json(f.read())
    ops = header["ops"]
    version = "1.5" if "packed-sections" in header["required_features"] else \
        "1.2" if any("esort" in op.get("values", {}).get("codec", []) for op in ops) else "1.0"
    assert r.exit_code == 0 and f"nnpatch format {version}" in r.stdout and "new_only" in r.stdout
    obj = json.loads(runner.invoke(cli, ["show", "--json", patch]).stdout)
    assert obj["version"] == version and {o["op"] for o in obj["ops"]} >= {"add", "remove", "whole"}


def test_version_names_the_kernel(runner):
    from nnpatch import kernel

    r = runner.invoke(cli, ["--version"])
    assert r.exit_code == 0 and f"kernel {kernel.backend}" in r.stdout


def test_debug_shows_traceback(runner, tmp_path, made):
    base, _, _ = made
    r = runner.invoke(cli, ["--debug", "apply", base, str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and r.exception is not None


def test_real_subprocess(made, tmp_path):
    base, target, patch = made
    out = tmp_path / "sub.safetensors"
    env = {**os.environ, "NNPATCH_KERNEL": "numpy"}
    p = subprocess.run([sys.executable, "-m", "nnpatch", "apply", base, patch, "-o", str(out)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert read(out) == read(target)
    p = subprocess.run([sys.executable, "-m", "nnpatch", "apply", target, patch, "-o", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 4 and p.stderr.startswith("Error: ") and "Traceback" not in p.stderr
    assert read(out) == read(target)


def test_demo_synthetic(runner, tmp_path):
    r = runner.invoke(cli, ["demo", "--dir", str(tmp_path / "d"), "--json", "--synthetic"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["verified"] is True and obj["patch_bytes"] < 0.2 * obj["model_bytes"]


@pytest.mark.torch
def test_demo_trains_a_sparse_update(runner, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    r = runner.invoke(cli, ["demo", "--dir", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["verified"] is True and obj["percent_channels_changed"] <= 10.0
    assert obj["accuracy"]["sparse_update"] > obj["accuracy"]["base"]
    assert obj["patch_bytes"] < 0.2 * obj["model_bytes"]


def test_textconv_is_stable_and_shows_changes(made, runner):
    base, target, _ = made
    a = runner.invoke(cli, ["textconv", base]).stdout
    assert a == runner.invoke(cli, ["textconv", base]).stdout
    b = runner.invoke(cli, ["textconv", target]).stdout
    changed = {line.split()[0] for line in set(a.splitlines()) ^ set(b.splitlines())}
    assert {"conv.weight", "new_only", "old_only", "same"} & changed == {"conv.weight", "new_only", "old_only"}


def test_hash_expect_size(made, runner):
    base, _, _ = made
    size = os.path.getsize(base)
    assert runner.invoke(cli, ["hash", base, "--expect-size", str(size)]).exit_code == 0
    r = runner.invoke(cli, ["hash", base, "--expect-size", str(size + 1)])
    assert r.exit_code == 1 and r.stderr == f"Error: {base}: {size} bytes, expected {size + 1}\n"
    assert runner.invoke(cli, ["hash", base, base, "--expect-size", "1"]).exit_code == 2
