"""nnpatch show: per-tensor changed share with bars, and --plot."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch.cli import cli
from nnpatch.patchfile import read_patch
from nnpatch.report import bar, tensor_shares
from nnpatch.weights import write_safetensors


@pytest.fixture
def patch(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 64)).astype("<f4")
    e = rng.standard_normal(1000).astype("<f4")
    base = {"w": ("F32", (20, 64), w.tobytes()), "e": ("F32", (1000,), e.tobytes())}
    w2, e2 = w.copy(), e.copy()
    w2[[1, 2, 3, 7, 11]] += 1  # 5 of 20 rows
    e2[[10, 500]] = 0  # 2 of 1000 elements
    target = dict(base, w=("F32", (20, 64), w2.tobytes()), e=("F32", (1000,), e2.tobytes()),
                  n=("F32", (3,), b"\0" * 12))
    write_safetensors(tmp_path / "a", base)
    write_safetensors(tmp_path / "b", target)
    nnpatch.diff(tmp_path / "a", tmp_path / "b", tmp_path / "p.nnpatch")
    return tmp_path / "p.nnpatch"


def test_shares_come_from_the_ops(patch):
    with read_patch(patch) as p:
        shares = {s.name: (s.op, s.share) for s in tensor_shares(p.header)}
        sizes = {s.name: s.patch_bytes for s in tensor_shares(p.header)}
        assert sizes == {op.name: sum(s.length for s in op.sections()) for op in p.ops}
    assert shares == {"e": ("elements", 0.002), "n": ("add", 1.0), "w": ("rows", 0.25)}


def test_bar_scales_with_the_fraction():
    assert bar(0.0) == " " * 12 and bar(1.0) == "█" * 12
    assert bar(0.5) == "█" * 6 + " " * 6
    assert bar(0.25, width=8) == "██" + " " * 6
    assert len(bar(0.33)) == 12 and bar(2.0) == "█" * 12


def test_show_prints_bars_and_draws_a_plot(patch, tmp_path):
    pytest.importorskip("matplotlib")
    r = CliRunner().invoke(cli, ["show", str(patch), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "25.0%" in r.output and "100.0%" in r.output and "███" in r.output
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_without_matplotlib_is_a_one_line_error(patch, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = CliRunner().invoke(cli, ["show", str(patch), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code != 0 and "pip install 'nnpatch[plot]'" in r.output
    assert not (tmp_path / "p.png").exists()
