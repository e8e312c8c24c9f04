"""docs/TRAIN-SPARSE.md's bring-your-own-model example, run as a new user would run it.

The ```python file=NAME blocks are written to an empty folder; every ```console command ($ lines,
with their continuation lines) runs there in order through a shell, with the installed ``nnpatch``
console script (no working directory on the import path unless nnpatch puts it there); then the
other ```python blocks run as scripts. Every command must succeed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.torch, pytest.mark.slow]

DOC = Path(__file__).resolve().parent.parent / "docs" / "TRAIN-SPARSE.md"
_BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks():
    """(language, info, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in _BLOCK.finditer(DOC.read_text())]


def commands(body: str) -> list[str]:
    out: list[str] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append(line[2:])
        elif out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
    return out


def test_the_doc_has_a_complete_example():
    found = blocks()
    files = {info.split("=", 1)[1] for lang, info, _ in found if info.startswith("file=")}
    assert {"mymodel.py", "mydata.py", "make_base.py"} <= files
    cmds = [c for lang, _, body in found if lang == "console" for c in commands(body)]
    assert any(c.startswith("nnpatch train-sparse --model mymodel:build --data mydata:loaders") for c in cmds)
    assert any("--resume" in c for c in cmds) and any(c.startswith("nnpatch apply") for c in cmds)


def test_the_bring_your_own_model_example_runs(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "nnpatch").is_file():
        pytest.skip("the nnpatch console script is not installed beside this python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    scripts = []
    for lang, info, body in blocks():
        if info.startswith("file="):
            (tmp_path / info.split("=", 1)[1]).write_text(body)
        elif lang == "python":
            scripts.append(body)
    ran = 0
    for lang, _, body in blocks():
        if lang != "console":
            continue
        for cmd in commands(body):
            proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"$ {cmd}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
            ran += 1
            if cmd.startswith("nnpatch train-sparse") and "--resume" not in cmd and "--checkpoint" not in cmd:
                assert "free channels 7/28" in proc.stderr and "eval accuracy" in proc.stderr
    assert ran >= 5
    assert (tmp_path / "out" / "new.safetensors").is_file() and (tmp_path / "out" / "run.ckpt").is_file()
    for i, body in enumerate(scripts):
        script = tmp_path / f"doc_snippet_{i}.py"
        script.write_text(body)
        proc = subprocess.run([str(bin_dir / "python"), script.name], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{body}\n{proc.stderr[-3000:]}"
