"""train-sparse's plug-in contract (issue 17, section 1), through the main CLI and its one error handler.

--data gives loaders (real DataLoaders, lists, re-iterables without a length) or datasets; whatever the
user's code raises is one line naming the SPEC (exit 6); module SPECs are found from the working
directory; --help states the contract; --checkpoint/--resume end exactly where the uninterrupted run
ends; progress explains itself; a missed --budget exits 1; the base's metadata is kept; output
folders are created.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from nnpatch import errors  # noqa: E402
from nnpatch.cli import cli  # noqa: E402

pytestmark = pytest.mark.torch

PLUGIN = textwrap.dedent('''
    import os

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset, TensorDataset


    def model():
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


    def mlp():  # 16,900 parameters, trained in no time: a patch well above its header's size
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 256), nn.ReLU(), nn.Linear(256, 28), nn.ReLU(),
                             nn.Linear(28, 4))


    def tensors(n=80):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 6, 6, generator=g)
        y = (x[:, 0, :3].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :3].sum((1, 2)) > 0).long()
        return x, y


    def loaders():
        x, y = tensors()
        return (DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True),
                DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16))


    class Chunks:
        """Re-iterable, no len(): the trainer counts its batches once."""

        def __init__(self, x, y, size):
            self.x, self.y, self.size = x, y, size

        def __iter__(self):
            for i in range(0, len(self.x), self.size):
                yield self.x[i:i + self.size], self.y[i:i + self.size]


    def plain():
        x, y = tensors()
        return Chunks(x[:64], y[:64], 16), [(x[64:], y[64:])]


    def one_shot():
        train, evaluation = loaders()
        return iter(train), evaluation


    def raises():
        raise ValueError("no such column: label")


    def three():
        return loaders() + (None,)


    class Broken(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            if i == 37:
                raise KeyError(f"sample {i} is missing")
            x, y = tensors()
            return x[i], y[i]


    def broken():
        x, y = tensors()
        return Broken(), TensorDataset(x[64:], y[64:])


    def dicts():
        x, y = tensors()
        return [{"x": x[:16], "y": y[:16]}], [(x[64:], y[64:])]


    def two_channels():
        x, y = tensors()
        x = x.repeat(1, 2, 1, 1)
        return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), [(x[64:], y[64:])]


    class Stopping:
        """A DataLoader that is interrupted (Ctrl-C) at its PLUGIN_STOP_AT-th batch, counted over the run."""

        def __init__(self, loader, stop):
            self.loader, self.stop, self.seen = loader, stop, 0

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                self.seen += 1
                if self.seen == self.stop:
                    raise KeyboardInterrupt
                yield batch


    def stopping():
        train, evaluation = loaders()
        return Stopping(train, int(os.environ.get("PLUGIN_STOP_AT", "0"))), evaluation
''')


@pytest.fixture
def plug(tmp_path):
    """(spec file, base weights, base weights of mlp()) for PLUGIN."""
    from safetensors.torch import save_file

    spec = tmp_path / "plugin.py"
    spec.write_text(PLUGIN)
    ns: dict = {}
    exec(compile(PLUGIN, str(spec), "exec"), ns)
    out = []
    for name in ("model", "mlp"):
        torch.manual_seed(0)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in ns[name]().state_dict().items()}, str(path),
                  metadata={"format": "pt", "producer": "plugin test"})
        out.append(path)
    return spec, out[0], out[1]


def run(*args, env=None):
    return CliRunner().invoke(cli, ["train-sparse", *map(str, args)], env=env)


def common(tmp_path, spec, base, data="loaders", model="model", name="new"):
    return ["--model", f"{spec}:{model}", "--data", f"{spec}:{data}", "--base", base,
            "-o", tmp_path / f"{name}.safetensors", "--patch", tmp_path / f"{name}.nnpatch"]


def read(p):
    return Path(p).read_bytes()


def one_error_line(res, code):
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in res.output
    return lines[-1]


# ---------------------------------------------------------------- loaders and datasets
def test_real_dataloaders_through_the_cli_and_the_patch_rebuilds_the_output(plug, tmp_path):
    import nnpatch

    spec, base, _ = plug
    res = run(*common(tmp_path, spec, base), "--ratio", "0.25", "--epochs", "2", "--teacher-epochs", "1", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert 0 < rep["channels_changed"] <= 4 and rep["channels_total"] == 18
    out = tmp_path / "rebuilt.safetensors"
    nnpatch.apply(str(base), str(tmp_path / "new.nnpatch"), str(out))
    assert read(out) == read(tmp_path / "new.safetensors")


def test_lists_and_reiterables_without_a_length_are_loaders_too(plug, tmp_path):
    spec, base, _ = plug
    res = run(*common(tmp_path, spec, base, data="plain"), "--ratio", "0.25", "--epochs", "1",
              "--teacher-epochs", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["channels_changed"] > 0


def test_batches_reads_each_kind():
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    from nnpatch.trainer.data import Batches

    x, y = torch.arange(40.0).reshape(10, 4), torch.arange(10)
    ds = TensorDataset(x, y)
    as_dataset = Batches(ds, batch_size=4)
    assert as_dataset.kind == "dataset" and as_dataset.num_batches() == 3 and as_dataset.num_batches(2) == 2
    assert sorted(torch.cat([b[1] for b in as_dataset.epoch(0)]).tolist()) == list(range(10))
    assert [b[1].tolist() for b in as_dataset.epoch(0, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    loader = Batches(DataLoader(ds, batch_size=3, shuffle=True), seed=5)
    assert loader.kind == "loader" and loader.num_batches() == 4 and loader.num_batches(2) == 2
    first = [b[1].tolist() for b in loader.epoch(0)]
    assert first == [b[1].tolist() for b in loader.epoch(0)]  # an epoch's order is (seed, epoch)'s alone
    assert first != [b[1].tolist() for b in loader.epoch(1)]
    assert [b[1].tolist() for b in loader.epoch(0, start=2)] == first[2:]
    ranks = [[b[1].tolist() for b in loader.epoch(0, rank=r, world=2)] for r in (0, 1)]
    assert ranks == [first[0:1] + first[2:3], first[1:2] + first[3:4]]  # every other batch, equal counts

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    stream = Batches(Stream(), batch_size=4)
    assert stream.kind == "loader" and [len(b[1]) for b in stream.epoch(0)] == [4, 4, 2]
    with pytest.raises(errors.UserCodeError, match="one-shot iterator"):
        Batches(iter([(x, y)]))
    with pytest.raises(errors.UserCodeError, match="not an \\(inputs, targets\\) pair"):
        list(Batches([(x, y, y)]).epoch(0))
    with pytest.raises(errors.UserCodeError, match="yielded a single sample"):
        list(Batches(list(ds)).epoch(0))  # a list of samples is not a list of batches
    with pytest.raises(errors.UserCodeError, match="neither iterable"):
        Batches(42)
    with pytest.raises(ZeroDivisionError):  # library use (no SPEC): the user's exception as it is
        list(Batches(_Raising()).epoch(0))
    with pytest.raises(errors.UserCodeError, match="^--data d:f: the training data: reading a batch raised "
                                                   "ZeroDivisionError: 1 / 0 \\(at .*test_trainer_plugin.py:"):
        list(Batches(_Raising(), spec="--data d:f").epoch(0))


class _Raising:
    def __iter__(self):
        raise ZeroDivisionError("1 / 0")


def test_evaluate_takes_a_loader_or_a_dataset_alike():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nnpatch.trainer import evaluate

    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    ds = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    assert evaluate(m, ds) == evaluate(m, DataLoader(ds, batch_size=7)) == evaluate(m, list(DataLoader(ds, 9)))


# ---------------------------------------------------------------- the user's code fails
@pytest.mark.parametrize("data, model, expected", [
    ("raises", "model", "--data {spec}:raises: calling raises() raised ValueError: no such column: label "
                        "(at plugin.py:"),
    ("three", "model", "--data {spec}:three: gave a 3-item tuple, expected a (train_loader, eval_loader) pair"),
    ("one_shot", "model", "--data {spec}:one_shot: the training data is a one-shot iterator"),
    ("broken", "model", "--data {spec}:broken: the training data: reading a batch raised KeyError: "
                        "'sample 37 is missing' (at plugin.py:"),
    ("dicts", "model", "--data {spec}:dicts: the training data yielded a dict, not an (inputs, targets) pair"),
    ("two_channels", "model", "training --model {spec}:model on --data {spec}:two_channels raised RuntimeError: "),
    ("loaders", "tensors", "--model {spec}:tensors: gave a tuple, not a torch.nn.Module"),
])
def test_a_failure_in_user_code_is_one_line_naming_the_spec_exit_6(plug, tmp_path, monkeypatch, data, model,
                                                                    expected):
    spec, base, _ = plug
    monkeypatch.chdir(tmp_path)  # the location is shown relative to the working directory
    res = run(*common(tmp_path, spec, base, data=data, model=model), "--epochs", "1", "--teacher-epochs", "1")
    line = one_error_line(res, errors.EXIT_USER_CODE)
    assert line.startswith("Error: " + expected.format(spec=spec)), line
    assert len(line) < 400


@pytest.mark.slow
def test_debug_shows_the_users_traceback(plug, tmp_path):
    spec, base, _ = plug
    args = [sys.executable, "-m", "nnpatch", "train-sparse", *map(str, common(tmp_path, spec, base, data="broken"))]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 6 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines()[-1].startswith(f"Error: --data {spec}:broken: the training data: reading")
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "sample 37 is missing" in debug.stderr
    assert 'plugin.py", line' in debug.stderr  # the user's own frame


def test_exit_codes_of_the_new_errors():
    assert errors.UserCodeError.exit_code == errors.EXIT_USER_CODE == 6
    assert issubclass(errors.BudgetMissedError, errors.TrainingError) and errors.BudgetMissedError.exit_code == 1


# ---------------------------------------------------------------- SPECs from the working directory
def test_a_module_spec_is_found_from_the_working_directory(tmp_path, monkeypatch):
    from nnpatch.trainer.usercode import load_spec

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helpers_t17.py").write_text("WIDTH = 5\n")
    (tmp_path / "sub" / "mymodel_t17.py").write_text(
        "from torch import nn\nfrom helpers_t17 import WIDTH\ndef build():\n    return nn.Linear(3, WIDTH)\n")
    (tmp_path / "sub" / "needs_t17.py").write_text("import no_such_dependency_t17\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UsageError) as e:
        load_spec("mymodel_t17:build", "--model")
    assert "no module named 'mymodel_t17' in the working directory" in str(e.value)
    assert "path/to/mymodel_t17.py:build" in str(e.value)
    assert load_spec("sub/mymodel_t17.py:build", "--model").out_features == 5  # a file imports its neighbours
    monkeypatch.chdir(tmp_path / "sub")
    assert load_spec("mymodel_t17:build", "--model").out_features == 5
    with pytest.raises(errors.UserCodeError, match="importing needs_t17 raised ModuleNotFoundError: "
                                                   "No module named 'no_such_dependency_t17'"):
        load_spec("needs_t17:build", "--model")
    with pytest.raises(errors.UsageError, match="has no attribute 'nope'"):
        load_spec("mymodel_t17:nope", "--model")
    with pytest.raises(errors.UsageError, match="expected module.path:callable"):
        load_spec("mymodel_t17:", "--model")


# ---------------------------------------------------------------- --help
def test_help_states_the_contract_the_channels_and_the_exit_codes():
    res = CliRunner().invoke(cli, ["train-sparse", "--help"], terminal_width=100)
    text = " ".join(res.output.split())
    for needed in ("build() returns a torch.nn.Module", "loaders() returns (train_loader, eval_loader)",
                   "any re-iterable of (inputs, targets) batches", "map-style Dataset",
                   "looked up from the working directory first",
                   "Channels (the units --ratio and --budget count)", "one output channel of Conv1d/2d/3d",
                   "one output row of Linear", "BatchNorm", "--checkpoint FILE", "--resume",
                   "6 the code behind --model or --data raised", "docs/TRAIN-SPARSE.md"):
        assert needed in text, needed


# ---------------------------------------------------------------- --checkpoint and --resume
@pytest.mark.parametrize("stop_at", [6, 14])  # 4 batches an epoch: in the teacher's 2nd epoch, the student's 2nd
def test_an_interrupted_run_resumed_ends_exactly_as_the_uninterrupted_one(plug, tmp_path, stop_at):
    spec, base, _ = plug
    opts = ["--ratio", "0.25", "--epochs", "2", "--teacher-epochs", "2", "--json"]
    ref = run(*common(tmp_path, spec, base, data="stopping", name="ref"), *opts,
              "--checkpoint", tmp_path / "ref.ckpt")
    assert ref.exit_code == 0, ref.output
    ckpt = tmp_path / "runs" / "a.ckpt"  # its folder is created
    args = [*common(tmp_path, spec, base, data="stopping", name="new"), *opts, "--checkpoint", ckpt]
    cut = run(*args, env={"PLUGIN_STOP_AT": str(stop_at)})
    assert cut.exit_code == 130 and ckpt.is_file() and not (tmp_path / "new.safetensors").exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["phase"] == ("teacher" if stop_at <= 8 else "student")
    assert state["trainer"]["step"] == 4 * ((stop_at - 1) // 4 - (0 if stop_at <= 8 else 2))
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed"] is True
    assert read(tmp_path / "new.safetensors") == read(tmp_path / "ref.safetensors")
    assert read(tmp_path / "new.nnpatch") == read(tmp_path / "ref.nnpatch")


def test_resume_refuses_another_run_or_no_checkpoint(plug, tmp_path):
    spec, base, _ = plug
    ckpt = tmp_path / "run.ckpt"
    args = [*common(tmp_path, spec, base), "--ratio", "0.25", "--epochs", "1", "--teacher-epochs", "1",
            "--checkpoint", ckpt]
    line = one_error_line(run(*args, "--resume"), 2)
    assert f"--resume: no checkpoint at {ckpt}" in line
    assert "--resume needs --checkpoint" in one_error_line(run(*common(tmp_path, spec, base), "--resume"), 2)
    assert run(*args, "--json").exit_code == 0
    line = one_error_line(run(*args[:-2], "--checkpoint", ckpt, "--seed", "1", "--resume"), 2)
    assert "was written by a run with other --seed (0, this run has 1)" in line
    line = one_error_line(run(*args, "--ratio", "0.5", "--resume"), 2)
    assert "other --ratio (0.25, this run has 0.5)" in line
    # a checkpoint of an nnpatch whose default channel ranking differed: resuming it would not continue that run
    state = torch.load(ckpt, weights_only=True)
    for older in ({**state, "meta": {k: v for k, v in state["meta"].items() if k != "selection"},
                   "trainer": {**state["trainer"], "config": {**state["trainer"]["config"],
                                                              "selection": "fisher_layer"}}},
                  {**state, "meta": {**state["meta"], "selection": "l1_layer"}}):
        torch.save(older, ckpt)
        line = one_error_line(run(*args, "--resume"), 2)
        assert "other channel ranking (an earlier nnpatch's default)" in line and "this run has 'fisher'" in line
    ckpt.write_bytes(b"not a checkpoint")
    assert "not a readable train-sparse checkpoint" in one_error_line(run(*args, "--resume"), 3)
    torch.save({"something": "else"}, ckpt)
    assert "not a train-sparse checkpoint" in one_error_line(run(*args, "--resume"), 3)


# ---------------------------------------------------------------- progress
def test_progress_explains_free_channels_and_shows_the_metric_and_the_time_left(plug, tmp_path):
    spec, base, _ = plug
    res = run(*common(tmp_path, spec, base), "--ratio", "0.25", "--epochs", "2", "--teacher-epochs", "1",
              "--checkpoint", tmp_path / "c.ckpt")
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert any(ln.startswith("checkpoint: ") and "--resume" in ln for ln in lines)
    assert any(ln.startswith("teacher: the full update") for ln in lines)
    assert any(ln.startswith("student: the sparse update, 2 epochs of 4 batches; free channels = channels still "
                             "allowed to change, from 18 down to 4 (--ratio 0.25 of 18) by epoch 1") for ln in lines)
    epochs = [ln for ln in lines if " epoch " in ln and ln.split(" epoch ")[0] in ("teacher", "student")]
    assert [ln.split(":")[0] for ln in epochs] == ["teacher epoch 1/1", "student epoch 1/2", "student epoch 2/2"]
    for ln in epochs:
        assert re.search(r": loss \d+\.\d{4}, eval accuracy \d+\.\d\d%", ln), ln
        assert re.search(r" \| \d+:\d\d elapsed, about \d+:\d\d left$", ln), ln
    assert "free channels 4/18" in epochs[-1]
    quiet = run("--quiet", *common(tmp_path, spec, base, name="q"), "--ratio", "0.25", "--epochs", "1",
                "--teacher-epochs", "1")
    assert quiet.exit_code == 0 and " epoch " not in quiet.stderr


def test_time_left_counts_both_phases():
    from nnpatch.trainer.progress import STUDENT_OVER_TEACHER, Progress, clock_text

    assert [clock_text(s) for s in (0, 7.4, 723, 3723)] == ["0:00", "0:07", "12:03", "1:02:03"]
    p = Progress(lambda s: None, {"teacher": 4, "student": 2})
    assert p.seconds_left() is None
    p.measured["teacher"] = [10.0]
    p.done["teacher"] = 1
    assert p.seconds_left() == pytest.approx(3 * 10 + 2 * 10 * STUDENT_OVER_TEACHER)
    p.measured["student"] = [20.0]
    p.done.update(teacher=4, student=1)
    assert p.seconds_left() == pytest.approx(20.0)


# ---------------------------------------------------------------- budget, metadata, folders
def test_a_met_budget_exits_0_and_its_patch_rebuilds_the_output(plug, tmp_path):
    spec, base, mlp_base = plug
    res = run(*common(tmp_path, spec, mlp_base, model="mlp", name="met"), "--budget", "40kB", "--epochs", "1",
              "--teacher-epochs", "1", "--delta-bits", "off", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["budget_met"] is True and rep["patch_bytes"] <= 40_000 < rep["model_bytes"]
    assert 0 < rep["channels_changed"] < rep["channels_total"]
    import nnpatch

    nnpatch.apply(str(mlp_base), str(tmp_path / "met.nnpatch"), str(tmp_path / "applied.safetensors"))
    assert read(tmp_path / "applied.safetensors") == read(tmp_path / "met.safetensors")


def _underestimating(monkeypatch, share: float) -> None:
    """Make the budget's estimate price channel values at ``share`` of what the probes measured, so
    that training keeps more channels than fit and the written patch comes out over the budget."""
    import nnpatch.trainer.run as run_module

    real = run_module.measure

    def measure(*args, **kwargs):
        cost = real(*args, **kwargs)
        cost.values = cost.values * share
        return cost
    monkeypatch.setattr(run_module, "measure", measure)


@pytest.mark.parametrize("bits", ["off", "4"])
def test_a_patch_over_the_budget_drops_its_least_important_channels_and_is_written_again(plug, tmp_path,
                                                                                         monkeypatch, bits):
    """Dropped channels are reset exactly: their elements take the base's bits, and in quantized deltas
    their codes become 0, so the rewritten patch still rebuilds the output."""
    spec, _, mlp_base = plug
    _underestimating(monkeypatch, 0.5 if bits == "off" else 0.3)
    res = run(*common(tmp_path, spec, mlp_base, model="mlp", name="fit"), "--budget", "30kB" if bits == "off" else "10kB",
              "--epochs", "1", "--teacher-epochs", "1", "--delta-bits", bits, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    budget = 30_000 if bits == "off" else 10_000
    assert rep["channels_dropped_to_fit"] > 0 and rep["estimated_update_bytes"] <= budget
    assert rep["budget_met"] is True and rep["patch_bytes"] == (tmp_path / "fit.nnpatch").stat().st_size <= budget
    assert rep["delta_bits"] == (None if bits == "off" else 4) and rep["chosen_by_budget"] == []
    assert rep["channels_changed"] == rep["channels_kept"] - rep["channels_dropped_to_fit"] > 0
    import nnpatch

    nnpatch.apply(str(mlp_base), str(tmp_path / "fit.nnpatch"), str(tmp_path / "applied.safetensors"))
    assert read(tmp_path / "applied.safetensors") == read(tmp_path / "fit.safetensors")


def test_a_patch_that_cannot_be_brought_within_the_budget_exits_1_with_the_files_written(plug, tmp_path,
                                                                                         monkeypatch):
    import nnpatch.trainer.run as run_module

    spec, _, mlp_base = plug
    _underestimating(monkeypatch, 0.5)
    monkeypatch.setattr(run_module, "_FIT_ROUNDS", 0)
    res = run(*common(tmp_path, spec, mlp_base, model="mlp", name="missed"), "--budget", "30kB", "--epochs", "1",
              "--teacher-epochs", "1", "--delta-bits", "off")
    line = one_error_line(res, 1)
    assert line.startswith("Error: the patch is ") and "bytes, over the --budget of 30,000 bytes" in line
    assert "were written" in line and "try a larger --budget" in line and "channels changed" in res.stderr
    assert (tmp_path / "missed.safetensors").is_file() and (tmp_path / "missed.nnpatch").is_file()
    res = run(*common(tmp_path, spec, mlp_base, model="mlp", name="missed"), "--budget", "30kB", "--epochs", "1",
              "--teacher-epochs", "1", "--delta-bits", "off", "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["error"]["kind"] == "BudgetMissedError"  # one JSON object: the error


def test_a_budget_below_the_smallest_patch_is_refused_before_training(plug, tmp_path):
    """The patch's fixed part (container, layout, digests) and the cheapest channel's op are measured by
    the real writer before anything trains: a budget below them is exit 2 with one line. (700 bytes: above
    this model's fixed part, about 560 bytes, below its smallest patch, about 840, since sections are packed.)"""
    spec, _, mlp_base = plug
    res = run(*common(tmp_path, spec, mlp_base, model="mlp", name="small"), "--budget", "700")
    line = one_error_line(res, 2)
    assert line.startswith("Error: a budget of 700 bytes is below the smallest patch of this model that changes "
                           "a channel, about ")
    assert "its fixed part: header, layout, digests: " in line
    assert "teacher" not in res.stderr and not (tmp_path / "small.safetensors").exists()
    assert not (tmp_path / "small.nnpatch").exists()


def test_the_output_keeps_the_bases_metadata_and_its_folders_are_created(plug, tmp_path):
    import nnpatch
    from safetensors import safe_open

    spec, base, _ = plug
    out = tmp_path / "ts" / "deeper" / "new.safetensors"
    patch = tmp_path / "patches" / "u.nnpatch"
    res = run("--model", f"{spec}:model", "--data", f"{spec}:loaders", "--base", base, "--ratio", "0.25",
              "--epochs", "1", "--teacher-epochs", "1", "-o", out, "--patch", patch, "--json")
    assert res.exit_code == 0, res.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "plugin test"}
    rebuilt = tmp_path / "rebuilt.safetensors"
    nnpatch.apply(str(base), str(patch), str(rebuilt))
    assert read(rebuilt) == read(out)

    (tmp_path / "afile").write_text("")
    res = run("--model", f"{spec}:model", "--data", f"{spec}:loaders", "--base", base, "--epochs", "1",
              "-o", tmp_path / "afile" / "new.safetensors", "--patch", patch)
    line = one_error_line(res, errors.EXIT_IO)
    assert "cannot create folder" in line and "afile" in line


@pytest.mark.slow
def test_the_console_script_finds_a_module_in_the_working_directory(plug, tmp_path):
    """As a new user runs it: `nnpatch train-sparse --model plugin:model` from the model's folder."""
    spec, base, _ = plug
    exe = Path(sys.executable).with_name("nnpatch")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-P", "-m", "nnpatch"]  # -P: no cwd on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([*cmd, "train-sparse", "--model", "plugin:model", "--data", "plugin:loaders",
                           "--base", base.name, "--ratio", "0.25", "--epochs", "1", "--teacher-epochs", "1",
                           "-o", "out/new.safetensors", "--patch", "out/u.nnpatch", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "new.safetensors").is_file()


def test_a_dataset_smaller_than_the_ranks_gives_every_rank_the_same_steps():
    """A dataset is padded like DistributedSampler pads it, however few its samples: every rank
    runs num_batches(world) steps (a rank with fewer would hang the others' all-reduce). An
    empty dataset is refused rather than promising a step it cannot give."""
    from torch.utils.data import TensorDataset

    from nnpatch.trainer.data import Batches

    ds = Batches(TensorDataset(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)), batch_size=2)
    for world in (1, 2, 3, 4, 8):
        steps = ds.num_batches(world)
        assert [len(list(ds.epoch(0, rank=r, world=world))) for r in range(world)] == [steps] * world, world
    empty = Batches(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), spec="--data d:f")
    with pytest.raises(errors.UserCodeError, match="^--data d:f: the training data has no samples"):
        empty.num_batches()
