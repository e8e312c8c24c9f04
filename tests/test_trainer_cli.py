"""The train-sparse command end to end: recipe, user specs, budget, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from nnpatch.errors import BudgetMissedError, UsageError, UserCodeError, WeightsError  # noqa: E402
from nnpatch.cli.train_sparse import train_sparse  # noqa: E402

from .test_json_schemas import check as check_schema  # noqa: E402

pytestmark = pytest.mark.torch

TINY_SPEC = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def model():
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(80, 1, 6, 6, generator=g)
        y = (x[:, 0, :3].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :3].sum((1, 2)) > 0).long()
        return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
''')


def _apply():
    from nnpatch import apply

    return apply


def read(p):
    with open(p, "rb") as f:
        return f.read()


@pytest.fixture
def tiny(tmp_path):
    """A user model/data spec file and its base weights."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    spec = tmp_path / "tinyspec.py"
    spec.write_text(TINY_SPEC)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(TINY_SPEC, str(spec), "exec"), ns)
    m = ns["model"]()
    base = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(base))
    return spec, base


def invoke(args):
    return CliRunner().invoke(train_sparse, args, catch_exceptions=True)


def test_recipe_digits_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    new = tmp_path / "new.safetensors"
    patch = tmp_path / "update.nnpatch"
    res = invoke(["--recipe", "digits", "--ratio", "0.1", "--epochs", "4", "--teacher-epochs", "4",
                  "-o", str(new), "--patch", str(patch), "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = check_schema("train-sparse", res.stdout)
    assert rep["ok"] is True
    base = tmp_path / "new.base.safetensors"
    assert rep["base"] == str(base) and base.is_file() and new.is_file() and patch.is_file()
    assert rep["channels_changed"] <= math.floor(0.1 * rep["channels_total"])
    assert 0 < rep["percent_channels_changed"] <= 10.0
    assert 0 < rep["percent_params_changed"] < 100
    assert rep["patch_bytes"] == os.path.getsize(patch) and rep["model_bytes"] == os.path.getsize(new)
    assert rep["patch_bytes"] < rep["model_bytes"]
    for k in ("base_metric", "teacher_metric", "student_metric"):
        assert 0 <= rep[k] <= 100
    assert rep["teacher_metric"] > rep["base_metric"]
    out = tmp_path / "applied.safetensors"
    _apply()(str(base), str(patch), str(out))
    assert read(out) == read(new)


def test_user_spec_budget_and_teacher_file(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    spec, base = tiny
    new = tmp_path / "new.safetensors"
    patch = tmp_path / "u.nnpatch"
    res = invoke(["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(base),
                  "--budget", "3kB", "--epochs", "2", "--teacher-epochs", "1", "--batch-size", "16",
                  "-o", str(new), "--patch", str(patch), "--json"])
    # a model this small makes a patch of mostly header (about 670 bytes): the estimate counts it
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(res.stdout)
    assert rep["budget_bytes"] == 3000 and rep["budget_met"] is True and rep["patch_bytes"] <= 3000
    assert rep["estimated_update_bytes"] <= 3000 and rep["channels_changed"] >= 1
    assert patch.stat().st_size == rep["patch_bytes"]
    b, n = load_file(str(base)), load_file(str(new))
    assert set(b) == set(n)
    assert torch.equal(b["1.num_batches_tracked"], n["1.num_batches_tracked"])
    out = tmp_path / "applied.safetensors"
    _apply()(str(base), str(patch), str(out))
    assert read(out) == read(new)

    # reuse the result as a given teacher; the rich table goes to stderr
    res = invoke(["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(base),
                  "--teacher", str(new), "--ratio", "0.25", "--epochs", "1", "--batch-size", "32",
                  "-o", str(tmp_path / "n2.safetensors"), "--patch", str(tmp_path / "u2.nnpatch")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "channels changed" in res.stderr and res.stdout == ""


@pytest.mark.parametrize("mode", ["adapt", "affine"])
def test_a_budget_the_norm_values_use_up_is_refused_before_training(tiny, tmp_path, mode):
    """Under --norm-stats adapt/affine the norm values of every channel are in the patch whatever the
    selection: they are paid from --budget first, and a budget they use up is a usage error at once."""
    pytest.importorskip("torch")
    spec, base = tiny
    res = invoke(["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(base), "--budget", "20",
                  "--norm-stats", mode, "-o", str(tmp_path / "n.safetensors"), "--patch", str(tmp_path / "p.nnpatch")])
    assert isinstance(res.exception, UsageError), res.output + repr(res.exception)  # exit 2 through the main CLI
    assert str(res.exception).startswith(f"a budget of 20 bytes leaves nothing for channels: with --norm-stats {mode}")
    assert "teacher" not in res.stderr
    assert not (tmp_path / "n.safetensors").exists() and not (tmp_path / "p.nnpatch").exists()


@pytest.mark.parametrize("args, error, text", [
    (["--recipe", "digits", "--model", "x:y"], UsageError, "cannot be combined"),
    (["--model", "x:y"], UsageError, "all of --model"),
    (["--recipe", "digits", "--ratio", "1.5"], UsageError, "--ratio"),
    (["--recipe", "digits", "--ratio", "0.1", "--budget", "1MB"], UsageError, "exclude"),
    (["--recipe", "digits", "--budget", "lots"], UsageError, "--budget"),
    (["--recipe", "digits", "--teacher", "t.safetensors", "--teacher-epochs", "2"], UsageError, "exclude"),
])
def test_usage_errors(tmp_path, args, error, text):
    res = invoke(args + ["-o", str(tmp_path / "n.safetensors"), "--patch", str(tmp_path / "p.nnpatch")])
    assert isinstance(res.exception, error), repr(res.exception)
    assert text in str(res.exception) and "\n" not in str(res.exception)


def test_spec_and_weights_errors(tiny, tmp_path):
    pytest.importorskip("torch")
    spec, base = tiny
    common = ["-o", str(tmp_path / "n.safetensors"), "--patch", str(tmp_path / "p.nnpatch")]
    res = invoke(["--model", "no_such_module_xyz:m", "--data", f"{spec}:data", "--base", str(base)] + common)
    assert isinstance(res.exception, UsageError) and "no_such_module_xyz" in str(res.exception)
    res = invoke(["--model", f"{spec}:nope", "--data", f"{spec}:data", "--base", str(base)] + common)
    assert isinstance(res.exception, UsageError) and "no attribute 'nope'" in str(res.exception)
    res = invoke(["--model", f"{spec}:data", "--data", f"{spec}:data", "--base", str(base)] + common)
    assert isinstance(res.exception, UserCodeError) and "not a torch.nn.Module" in str(res.exception)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    res = invoke(["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(bad)] + common)
    assert isinstance(res.exception, WeightsError) and "\n" not in str(res.exception)
    from safetensors.torch import load_file, save_file

    st = load_file(str(base))
    st.pop("0.weight")
    partial = tmp_path / "partial.safetensors"
    save_file(st, str(partial))
    res = invoke(["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(partial)] + common)
    assert isinstance(res.exception, WeightsError) and "0.weight" in str(res.exception)


def test_command_module_does_not_import_torch():
    code = "import sys, nnpatch.cli.train_sparse, nnpatch.trainer; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_standalone_entry_is_the_main_cli_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nnpatch", "train-sparse", "--model", "x:y",
                           "-o", str(tmp_path / "n"), "--patch", str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: give --recipe, or all of --model")  # the main CLI's wording
    proc = subprocess.run([sys.executable, "-m", "nnpatch", "train-sparse", "--help"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("Usage: nnpatch train-sparse [OPTIONS]")


def test_parse_bytes_and_module_specs():
    pytest.importorskip("torch")
    from nnpatch.trainer.run import load_spec, parse_bytes

    assert parse_bytes("2MB") == 2_000_000 and parse_bytes("512KiB") == 524288
    assert parse_bytes("1000") == 1000 and parse_bytes("1.5 kB") == 1500
    for bad in ("", "MB", "-1", "3 parsecs"):
        with pytest.raises(UsageError):
            parse_bytes(bad)
    model = load_spec("nnpatch.trainer.recipes:DigitsCNN", "--model")
    assert type(model).__name__ == "DigitsCNN"
    with pytest.raises(UsageError, match="expected module.path:callable"):
        load_spec("nnpatch.trainer.recipes", "--model")


def test_options_are_declared_once_for_the_command_the_run_and_the_trainer(tiny, tmp_path):
    import dataclasses

    from nnpatch.trainer import TrainerConfig, TrainSparseOptions
    from nnpatch.trainer.run import train_sparse_run

    declared = [f for f in dataclasses.fields(TrainSparseOptions) if "flags" in f.metadata]
    # (nnpatch.cli adds --quiet and --debug to a command it loads)
    assert [p.name for p in train_sparse.params][:len(declared) + 1] == [f.name for f in declared] + ["as_json"]
    shared = TrainSparseOptions(output="n", patch="p").trainer_fields()
    assert set(shared) <= {f.name for f in dataclasses.fields(TrainerConfig)} and "epochs" in shared

    spec, base = tiny
    common = dict(model_spec=f"{spec}:model", data_spec=f"{spec}:data", base=str(base), ratio=0.25,
                  epochs=1, teacher_epochs=1, batch_size=32)
    by_keywords = train_sparse_run(**common, output=str(tmp_path / "a.safetensors"), patch=str(tmp_path / "a.np"))
    by_object = train_sparse_run(TrainSparseOptions(**common, output="unused", patch="unused"),
                                 output=str(tmp_path / "b.safetensors"), patch=str(tmp_path / "b.np"))
    assert read(tmp_path / "a.safetensors") == read(tmp_path / "b.safetensors")
    assert by_keywords["channels_changed"] == by_object["channels_changed"] > 0
    with pytest.raises(TypeError):
        train_sparse_run(**common, output="n", patch="p", epoch=3)


def test_save_weights_replaces_the_file_whole_or_not_at_all(tmp_path):
    torch = pytest.importorskip("torch")
    from nnpatch.trainer.run import load_weights, save_weights

    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.zeros(3)}, path)
    save_weights({"a": torch.ones(3)}, path)
    assert torch.equal(load_weights(path)["a"], torch.ones(3))
    with pytest.raises(Exception):
        save_weights({"a": torch.zeros(3)}, path, metadata={"not": 1})  # safetensors wants str values
    assert torch.equal(load_weights(path)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("mode", ["adapt", "affine"])
def test_recipe_with_adapted_norm_stats(tmp_path, mode):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    new, patch = tmp_path / "new.safetensors", tmp_path / "u.nnpatch"
    res = invoke(["--recipe", "digits", "--ratio", "0.1", "--epochs", "3", "--teacher-epochs", "3",
                  "--norm-stats", mode, "-o", str(new), "--patch", str(patch), "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(res.stdout)
    assert rep["norm_stats"] == mode and rep["norm_stats_changed"] > 0
    assert rep["channels_changed"] <= math.floor(0.1 * rep["channels_total"])
    out = tmp_path / "applied.safetensors"
    _apply()(str(tmp_path / "new.base.safetensors"), str(patch), str(out))
    assert read(out) == read(new)


def test_method_tiny_updater_is_the_published_rule(tiny, tmp_path):
    """--method tiny-updater: L1 ranking, one cosine, frozen norm layers, full-precision values, also under
    --budget (which otherwise picks the deltas' width); options that would change the rule are refused."""
    pytest.importorskip("torch")
    spec, base = tiny
    common = ["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(base), "--method", "tiny-updater",
              "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "16", "--json"]
    res = invoke(common + ["--budget", "3kB", "-o", str(tmp_path / "n.safetensors"), "--patch", str(tmp_path / "p.nnpatch"),
                           "--checkpoint", str(tmp_path / "run.ckpt")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(res.stdout)
    assert rep["method"] == "tiny-updater" and rep["norm_stats"] == "frozen" and rep["delta_bits"] is None
    assert rep["chosen_by_budget"] == [] and rep["budget_met"] is True
    torch = pytest.importorskip("torch")
    meta = torch.load(tmp_path / "run.ckpt", weights_only=True)["meta"]
    assert meta["selection"] == "l1" and meta["method"] == "tiny-updater"
    for extra in (["--norm-stats", "affine"], ["--delta-bits", "4"]):
        res = invoke(common + extra + ["-o", str(tmp_path / "m.safetensors"), "--patch", str(tmp_path / "m.nnpatch")])
        assert isinstance(res.exception, UsageError) and "--method tiny-updater is the published rule" in str(res.exception)
        assert not (tmp_path / "m.nnpatch").exists()
