"""train-sparse under torchrun with 2 CPU processes (DDP over gloo)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from .test_trainer_cli import TINY_SPEC  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_two_processes_agree_and_keep_the_channel_rule(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from safetensors.torch import load_file, save_file

    spec = tmp_path / "tinyspec.py"
    spec.write_text(TINY_SPEC)
    ns: dict = {}
    exec(compile(TINY_SPEC, str(spec), "exec"), ns)
    torch.manual_seed(0)
    base = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in ns["model"]().state_dict().items()}, str(base))
    new = tmp_path / "new.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "nnpatch", "train-sparse", "--model", f"{spec}:model", "--data", f"{spec}:data",
         "--base", str(base), "--ratio", "0.2", "--epochs", "3", "--teacher-epochs", "2", "--batch-size", "8",
         "-o", str(new), "--patch", str(tmp_path / "u.nnpatch"), "--json"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1:] if "\n{\n" in proc.stdout else proc.stdout)
    assert rep["ok"] is True
    assert rep["world_size"] == 2 and rep["ranks_agree"] is True
    assert 0 < rep["channels_changed"] <= math.floor(0.2 * rep["channels_total"])
    # recount from the files: only whole channels changed, no more than allowed
    from nnpatch.trainer import changed_channels, group_channels

    model = ns["model"]()
    groups = group_channels(model)
    b, n = load_file(str(base)), load_file(str(new))
    check = changed_channels(n, b, groups)
    assert check["channels_changed"] == rep["channels_changed"]
    assert torch.equal(b["1.num_batches_tracked"], n["1.num_batches_tracked"])
