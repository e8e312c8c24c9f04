"""``nnpatch show`` on hostile patches: names and ``created_by`` holding
terminal escapes, rich markup, emoji codes and mathtext are
printed escaped and literally, never acted on, and never crash it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import blake3
import crafting
import numpy as np
import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch.cli import cli
from nnpatch.patchfile import TRAILER_SIZE
from nnpatch.report import printable
from nnpatch.weights import write_safetensors

# crafting.with_header writes UTF-8 JSON, which cannot hold a lone surrogate; this stands in for one
# and becomes its JSON escape afterwards (the same length, so no offset moves).
_SURROGATE_STAND_IN = "QQQQQQ"

HOSTILE = {
    "escapes": ("w\x1b]0;pwned\x07\x1b[2J\x9b\x7f", "me\x1b[31mred\x1b[0m\x85\u202e\u2028"),
    "markup": ("[/]x", "[bold]b[/bold] :smile:"),
    "mathtext": ("a$\\frac{$b", "$x^$"),
}
# What must not reach a terminal: C0 controls but newline, DEL, C1 controls.
_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def clean_patch(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    old = rng.standard_normal(16).astype("<f4")
    new = old.copy()
    new[3] += 1
    write_safetensors(d / "old.safetensors", {"w": ("F32", (4, 4), old.tobytes())})
    write_safetensors(d / "new.safetensors", {"w": ("F32", (4, 4), new.tobytes())})
    nnpatch.diff(d / "old.safetensors", d / "new.safetensors", d / "p.nnpatch")
    return (d / "p.nnpatch").read_bytes()


def craft(buf: bytes, path, *, name: str, created_by: str, op_kind: str | None = None) -> str:
    """The patch in ``buf`` with its one op renamed and ``created_by`` (and an x- key) replaced."""
    h = crafting.header_json(buf)
    assert len(h["ops"]) == 1  # one op: the new name cannot break the ops' order
    h["ops"][0]["name"] = name.replace("\udcff", _SURROGATE_STAND_IN)
    if op_kind is not None:
        h["ops"][0]["op"] = op_kind
    h["created_by"] = created_by.replace("\udcff", _SURROGATE_STAND_IN)
    h["x-note"] = created_by.replace("\udcff", _SURROGATE_STAND_IN)
    out = crafting.with_header(buf, h)
    body = out[:-TRAILER_SIZE].replace(_SURROGATE_STAND_IN.encode(), b"\\udcff")
    with open(path, "wb") as f:
        f.write(body + blake3.blake3(body).digest())
    return os.fspath(path)


def assert_clean(text: str) -> None:
    assert "Traceback" not in text
    bad = _CONTROLS.search(text)
    assert bad is None, f"control character {bad.group()!r} in output: {text!r}"
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_show_prints_hostile_text_escaped(clean_patch, tmp_path, case):
    name, created_by = HOSTILE[case]
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name=name, created_by=created_by)
    r = CliRunner().invoke(cli, ["show", patch])
    assert r.exit_code == 0, r.output
    assert_clean(r.stdout)
    assert_clean(r.stderr)
    assert f"made by {printable(created_by)}\n" in r.stdout
    assert f" {printable(name)} " in r.stdout


def test_escapes_are_spelled_out(clean_patch, tmp_path):
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name="a\x1b[2J\u2028\\b", created_by="x\U000e0001\x9by")
    r = CliRunner().invoke(cli, ["show", patch])
    assert r.exit_code == 0
    assert "made by x\\U000e0001\\x9by\n" in r.stdout
    assert " a\\x1b[2J\\u2028\\\\b " in r.stdout  # backslashes doubled: no name can spell another's escape


def test_markup_and_emoji_codes_print_literally(clean_patch, tmp_path):
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name="[/]x", created_by="[bold]b[/bold] :smile:")
    r = CliRunner().invoke(cli, ["show", patch])
    assert r.exit_code == 0, r.output
    assert "made by [bold]b[/bold] :smile:" in r.stdout and " [/]x " in r.stdout


@pytest.mark.parametrize("encoding", [None, "ascii", "utf-8"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_show_in_a_real_process(clean_patch, tmp_path, case, encoding):
    """Through the console entry point, with the real stdout encoding (ascii too: no crash, no glyph lost)."""
    name, created_by = HOSTILE[case]
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name=name, created_by=created_by)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "NO_COLOR", "FORCE_COLOR")}
    if encoding:
        env["PYTHONIOENCODING"] = encoding
    r = subprocess.run([sys.executable, "-m", "nnpatch", "show", patch], capture_output=True, env=env)
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 0, err
    assert_clean(out)
    assert_clean(err)
    if encoding == "ascii":
        assert out.isascii()
        assert f"made by {printable(created_by, encoding='ascii')}" in out
    else:
        assert f"made by {printable(created_by)}" in out
    assert "6.2%" in out


@pytest.mark.parametrize("encoding", [None, "ascii"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_show_json_stays_valid(clean_patch, tmp_path, case, encoding):
    name, created_by = HOSTILE[case]
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name=name, created_by=created_by)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    if encoding:
        env["PYTHONIOENCODING"] = encoding
    r = subprocess.run([sys.executable, "-m", "nnpatch", "show", "--json", patch], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.isascii()
    assert_clean(r.stdout.decode())
    obj = json.loads(r.stdout)
    assert obj["ops"][0]["name"] == name and obj["created_by"] == created_by and obj["x-note"] == created_by


def test_plot_draws_mathtext_names_as_text(clean_patch, tmp_path):
    pytest.importorskip("matplotlib")
    name, created_by = HOSTILE["mathtext"]
    patch = craft(clean_patch, tmp_path / "a$\\frac{$b.nnpatch", name=name, created_by=created_by)
    for fmt in ("png", "svg"):
        out = tmp_path / f"plot.{fmt}"
        r = CliRunner().invoke(cli, ["show", patch, "--plot", str(out)])
        assert r.exit_code == 0, r.output
        assert_clean(r.output)
        assert out.stat().st_size > 1000
    assert "$\\\\frac{$b" in (tmp_path / "plot.svg").read_text()  # the label as text, not typeset


@pytest.mark.parametrize("case", ["escapes", "markup"])
def test_plot_draws_hostile_names(clean_patch, tmp_path, case):
    pytest.importorskip("matplotlib")
    name, created_by = HOSTILE[case]
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name=name, created_by=created_by)
    r = CliRunner().invoke(cli, ["show", patch, "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert_clean(r.output)


def test_lone_surrogate_is_a_bad_patch_in_one_clean_line(clean_patch, tmp_path):
    """A lone surrogate escape is valid JSON syntax but not Unicode text: the header is refused
    (FORMAT.md section 5), and the error line stays printable."""
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name="w\udcff", created_by="c\udcff")
    r = subprocess.run([sys.executable, "-m", "nnpatch", "show", patch], capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == ""
    assert "lone surrogate" in r.stderr and r.stderr.count("\n") == 1
    assert_clean(r.stderr)


def test_bad_patch_is_one_error_line(clean_patch, tmp_path):
    """An unknown op kind (hostile text in it) is a bad patch: exit 3, one clean line."""
    patch = craft(clean_patch, tmp_path / "p.nnpatch", name="w", created_by="x", op_kind="\x1b[2Jzap\n[/]")
    r = subprocess.run([sys.executable, "-m", "nnpatch", "show", patch], capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert_clean(r.stderr)


def test_hostile_file_name_in_an_error_is_escaped(tmp_path):
    missing = os.fspath(tmp_path / "no\x1b[2Jsuch\npatch")
    r = CliRunner().invoke(cli, ["show", missing])
    assert r.exit_code == 5
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert_clean(r.stderr)
    assert "no\\x1b[2Jsuch\\npatch" in r.stderr


def test_printable():
    assert printable("conv.weight") == "conv.weight"
    assert printable("a\tb\nc\rd\x00\x1b\x7f\x85\xa0\u200b\u202e\u2028\udcff\U000e0001\ue000") == (
        "a\\tb\\nc\\rd\\x00\\x1b\\x7f\\x85\\xa0\\u200b\\u202e\\u2028\\udcff\\U000e0001\\ue000")
    assert printable("a\\b") == "a\\\\b" and printable("a\\b", backslash=False) == "a\\b"
    assert printable("é█😀") == "é█😀"
    assert printable("é█😀", encoding="ascii") == "\\xe9\\u2588\\U0001f600"
    assert printable("é", encoding="latin-1") == "é"
