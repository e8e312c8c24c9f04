"""``nnpatch diff OLD NEW -o PATCH --quantized DELTAS``: exact quantized deltas (format 1.3, the ``qrows``
op) from a deltas file on the command line, for users who did their own quantization-aware training.
The round trip is byte for byte; every bad deltas file or option is one ``Error:`` line with its
documented exit code, a JSON error object with ``--json``, and no patch left behind."""

from __future__ import annotations

import json
import os

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch import quantdelta
from nnpatch.cli import cli
from nnpatch.differ import save_quant_deltas
from nnpatch.hashing import hash_file
from nnpatch.quantdelta import QuantDelta
from nnpatch.weights import write_safetensors

from .conftest import read

SCHEMA = os.path.join(os.path.dirname(__file__), os.pardir, "spec", "json", "error.schema.json")


@pytest.fixture
def runner():
    return CliRunner()


def _quantized_tensor(rng, dtype: str, shape, rows, bits: int, per_row: bool = True):
    """(old words, new words, QuantDelta) with new = old + scale * code by nnpatch.quantdelta's arithmetic."""
    x = (rng.standard_normal(shape) * 0.05).astype("<f4").reshape(shape[0], -1)
    if dtype == "BF16":
        old = (x.view("<u4") >> 16).astype("<u2")
    elif dtype == "F16":
        old = x.astype("<f2").view("<u2")
    else:
        old = x.view("<u4")
    rows = np.asarray(rows)
    wanted = quantdelta.to_f32(old[rows], dtype) + rng.standard_normal((len(rows), old.shape[1])).astype("<f4") * 0.01
    scales, codes = quantdelta.quantize(old[rows], wanted, dtype, bits, per_row=per_row)
    qd = QuantDelta(rows, scales, codes, bits)
    return old, qd.apply(old, dtype), qd


@pytest.fixture
def qpair(tmp_path):
    """OLD and NEW safetensors files and a deltas file D for them: ``w`` (F32, 8-bit codes, a scale per row)
    and ``emb`` (BF16, 4-bit codes, one scale) changed by quantized deltas, ``b`` changed plainly, ``gone``
    only in OLD."""
    rng = np.random.default_rng(17)
    w_old, w_new, w_qd = _quantized_tensor(rng, "F32", (32, 12), [2, 3, 17, 30], 8)
    e_old, e_new, e_qd = _quantized_tensor(rng, "BF16", (20, 7), [0, 19], 4, per_row=False)
    bias = np.arange(32, dtype="<f4")
    gone = np.ones((4, 3), "<f4")
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    write_safetensors(old, {"w": ("F32", (32, 12), w_old.tobytes()), "emb": ("BF16", (20, 7), e_old.tobytes()),
                            "b": ("F32", (32,), bias.tobytes()), "gone": ("F32", (4, 3), gone.tobytes())})
    write_safetensors(new, {"w": ("F32", (32, 12), w_new.tobytes()), "emb": ("BF16", (20, 7), e_new.tobytes()),
                            "b": ("F32", (32,), (bias + 1).tobytes())})
    deltas = tmp_path / "deltas.safetensors"
    save_quant_deltas(deltas, {"w": w_qd, "emb": e_qd})
    return str(old), str(new), str(deltas), {"w": w_qd, "emb": e_qd}


def _one_line_error(r, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


# --- the round trip ----------------------------------------------------------------------------

def test_quantized_patch_applies_byte_for_byte(qpair, runner, tmp_path):
    old, new, deltas, qds = qpair
    patch, out = str(tmp_path / "p.nnpatch"), str(tmp_path / "out.safetensors")
    r = runner.invoke(cli, ["diff", old, new, "-o", patch, "--quantized", deltas, "--json", "--aligned"])
    assert r.exit_code == 0, r.output
    ops = {c["name"]: c["op"] for c in json.loads(r.stdout)["changed"]}
    assert ops == {"w": "qrows", "emb": "qrows", "b": "whole", "gone": "remove"}
    with nnpatch.read_patch(patch) as p:
        assert p.header.version == (1, 3)
        assert not p.header.reversible
        bits = {op.name: op.bits for op in p.ops if op.kind == "qrows"}
    assert bits == {"w": 8, "emb": 4}
    r = runner.invoke(cli, ["apply", old, patch, "-o", out])
    assert r.exit_code == 0, r.output
    assert read(out) == read(new)
    assert hash_file(out) == hash_file(new)


def test_stat_names_the_qrows_tensors(qpair, runner, tmp_path):
    old, new, deltas, _ = qpair
    r = runner.invoke(cli, ["diff", old, new, "-o", str(tmp_path / "p.nnpatch"), "--quantized", deltas, "--stat"])
    assert r.exit_code == 0, r.output
    assert "4/32 rows" in r.stdout and "2/20 rows" in r.stdout


def test_plain_diff_of_the_same_pair_has_no_qrows(qpair, runner, tmp_path):
    old, new, _, _ = qpair
    patch, out = str(tmp_path / "p.nnpatch"), str(tmp_path / "out.safetensors")
    r = runner.invoke(cli, ["diff", old, new, "-o", patch, "--aligned"])
    assert r.exit_code == 0, r.output
    with nnpatch.read_patch(patch) as p:
        assert p.header.version < (1, 3)
        assert "qrows" not in {op.kind for op in p.ops}
    assert runner.invoke(cli, ["apply", old, patch, "-o", out]).exit_code == 0
    assert read(out) == read(new)


def test_directory_pair_takes_quantized_deltas(qpair, runner, tmp_path):
    """qrows works on tensors, whatever holds them: a Hugging Face model directory is patched and
    rebuilt file for file."""
    old, new, deltas, _ = qpair
    for name, src in (("v1", old), ("v2", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(read(src))
        (tmp_path / name / "config.json").write_text('{"model_type": "test"}')
    patch, out = str(tmp_path / "d.nnpatch"), tmp_path / "v2-new"
    r = runner.invoke(cli, ["diff", str(tmp_path / "v1"), str(tmp_path / "v2"), "-o", patch, "--quantized", deltas,
                            "--aligned"])
    assert r.exit_code == 0, r.output
    with nnpatch.read_patch(patch) as p:
        assert p.header.version == (1, 3) and "qrows" in {op.kind for op in p.ops}
    r = runner.invoke(cli, ["apply", str(tmp_path / "v1"), patch, "-o", str(out)])
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "config.json"):
        assert read(out / f) == read(tmp_path / "v2" / f)


def test_help_describes_the_option(runner):
    r = runner.invoke(cli, ["diff", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    assert "--quantized DELTAS" in text
    for words in ("NAME.rows U64", "NAME.scales F32", "NAME.codes I8", "NAME.bits U8",
                  "nnpatch.differ.save_quant_deltas", "1.3 reader", "rebuild NEW exactly is refused"):
        assert words in text, words


# --- what is refused -------------------------------------------------------------------------

def _write_deltas(path, tensors):
    write_safetensors(path, tensors, {"format": "nnpatch-quant-deltas-1"})
    return str(path)


def _bad(case: str, tmp_path, old, new, deltas, qds):
    """(extra arguments, exit code, part of the Error: line) for each bad input."""
    w = qds["w"]
    if case == "missing":
        return ["--quantized", str(tmp_path / "nope.safetensors")], 5, "nope.safetensors: cannot open"
    if case == "directory":
        return ["--quantized", str(tmp_path)], 5, "is a directory, expected a deltas file"
    if case == "patch":
        p = str(tmp_path / "other.nnpatch")
        nnpatch.diff(old, new, p)
        return ["--quantized", p], 2, "is a patch, given as --quantized"
    if case == "not-safetensors":
        (tmp_path / "junk.bin").write_bytes(b"not a deltas file at all " * 4)
        return ["--quantized", str(tmp_path / "junk.bin")], 3, "not a safetensors file; --quantized takes"
    if case == "onnx":
        (tmp_path / "m.onnx").write_bytes(b"\x08\x07" + bytes(30))
        return ["--quantized", str(tmp_path / "m.onnx")], 3, "an ONNX model; --quantized takes"
    if case == "a-model":
        return ["--quantized", new], 3, "is not part of a quantized delta"
    if case == "lacks-a-part":
        d = _write_deltas(tmp_path / "d.safetensors", {"w.rows": ("U64", (1,), np.array([1], "<u8").tobytes())})
        return ["--quantized", d], 3, "quantized delta 'w' lacks"
    if case == "empty-bits":
        d = _write_deltas(tmp_path / "d.safetensors", {
            "w.rows": ("U64", (1,), np.array([1], "<u8").tobytes()),
            "w.scales": ("F32", (1,), np.array([0.5], "<f4").tobytes()),
            "w.codes": ("I8", (1, 12), bytes(12)), "w.bits": ("U8", (0,), b"")})
        return ["--quantized", d], 3, "'bits' holds 0 values, expected 1"
    if case == "nan-scale":
        d = _write_deltas(tmp_path / "d.safetensors", {
            "w.rows": ("U64", (1,), np.array([1], "<u8").tobytes()),
            "w.scales": ("F32", (1,), np.array([np.nan], "<f4").tobytes()),
            "w.codes": ("I8", (1, 12), bytes(12)), "w.bits": ("U8", (), b"\x08")})
        return ["--quantized", d], 3, "scales must be finite"
    if case == "tensor-not-in-new":
        d = tmp_path / "d.safetensors"
        save_quant_deltas(d, {"gone": QuantDelta([0], [0.5], np.ones((1, 3), np.int8), 8)})
        return ["--quantized", str(d)], 2, "quantized delta for 'gone': the target has no such tensor"
    if case == "wrong-shape":
        d = tmp_path / "d.safetensors"
        save_quant_deltas(d, {"w": QuantDelta(w.rows, w.scales, w.codes[:, :5], 8)})
        return ["--quantized", str(d)], 2, "do not fit 32 rows of 12 elements"
    if case == "does-not-rebuild":
        codes = w.codes.copy()
        codes[0, 0] = codes[0, 0] + 1 if codes[0, 0] < 127 else 0
        d = tmp_path / "d.safetensors"
        save_quant_deltas(d, {"w": QuantDelta(w.rows, w.scales, codes, 8)})
        return ["--quantized", str(d)], 2, "does not rebuild the target"
    if case == "reversible":
        return ["--quantized", deltas, "--reversible"], 2, "--quantized and --reversible exclude each other"
    raise AssertionError(case)


CASES = ["missing", "directory", "patch", "not-safetensors", "onnx", "a-model", "lacks-a-part", "empty-bits",
         "nan-scale", "tensor-not-in-new", "wrong-shape", "does-not-rebuild", "reversible"]


@pytest.mark.parametrize("case", CASES)
def test_bad_deltas_are_one_error_line(case, qpair, runner, tmp_path):
    old, new, deltas, qds = qpair
    extra, code, words = _bad(case, tmp_path, old, new, deltas, qds)
    patch = tmp_path / "p.nnpatch"
    line = _one_line_error(runner.invoke(cli, ["diff", old, new, "-o", str(patch), *extra]), code)
    assert words in line, line
    assert not patch.exists()
    # --json: the error object on stdout, the same line on stderr
    r = runner.invoke(cli, ["diff", old, new, "-o", str(patch), *extra, "--json"])
    assert r.exit_code == code
    obj = json.loads(r.stdout)
    with open(SCHEMA, encoding="utf-8") as f:
        jsonschema.validate(obj, json.load(f))
    assert obj["ok"] is False and obj["error"]["code"] == code
    assert f"Error: {obj['error']['message']}" == r.stderr.strip()
    assert not patch.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("p.nnpatch")]  # no temporary left either
