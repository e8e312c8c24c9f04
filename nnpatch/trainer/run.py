"""The ``train-sparse`` plumbing around the Tiny Updater (``tiny_updater.update``): M0, files, ranks, patch.

The plug-in contract (docs/TRAIN-SPARSE.md): ``--model SPEC`` gives an
``nn.Module`` (the architecture; its weights are replaced by ``--base``);
``--data SPEC`` gives ``(train, eval)``, each a DataLoader or any re-iterable of
``(inputs, targets)`` batches, or a map-style dataset of ``(input, target)``
samples (:mod:`nnpatch.trainer.data`); targets are class indices for
classification, tensors shaped like the output for regression.  SPEC is
``module.path:name`` (looked up from the working directory first) or
``path/to/file.py:name``; a callable ``name`` is called with no arguments
(:mod:`nnpatch.trainer.usercode`).  Whatever the user's code raises, or a
result that breaks the contract, ends as one :class:`~nnpatch.errors.UserCodeError`
line (exit 6) naming the SPEC.

What the command does: (1) M0 = ``--base`` loaded into the ``--model`` architecture
(with ``--recipe digits``: trained on the old digits and written to
``<stem>.base.safetensors`` beside ``-o`` or to ``--base-out``); (2) a teacher =
M0 fine-tuned with every parameter free for ``--teacher-epochs`` (or ``--teacher``);
(3) the student = M0 trained with task loss + ``--kd-weight`` x KD under a
channel-sparse update (cubic schedule down to ``--ratio`` of the channels, or to
what fits ``--budget`` bytes as the patch writer prices them, :mod:`nnpatch.trainer.patch_cost`,
measured before training; without ``--delta-bits`` the budget picks the deltas' width,
:func:`choose_bits`) -- (2) and (3) are
``tiny_updater.update``, which writes ``--checkpoint`` after every epoch and goes
on from it with ``--resume``; (3b) with ``--delta-bits 8|4``, a short quantization-aware
phase and the final weights computed by the ``qrows`` arithmetic (:mod:`nnpatch.trainer.quant`),
so that the patch's ``qrows`` ops rebuild them exactly; (4) the student is
saved in the base file's dtypes (frozen channels round-trip bit-exactly) with the
base file's safetensors metadata, and with
``num_batches_tracked`` and every other non-float tensor reset to M0's value so
they never count as a change; (5) the changed channels are recounted from the
bytes and checked against the target; (6) ``nnpatch.diff(base, -o, --patch)``;
(7) a patch larger than ``--budget`` drops its least important channels and is written
again (:mod:`nnpatch.trainer.fit`); one that cannot be brought within it raises
:class:`~nnpatch.errors.BudgetMissedError` (exit 1) after both files are written.
Missing folders of the output files are created.
Under ``torchrun`` every rank trains (DDP, gloo on CPU); the ranks' final weights
are compared by digest and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..differ import diff, save_quant_deltas
from ..errors import BudgetMissedError, NnpatchIOError, TrainingError, UsageError, UserCodeError, WeightsError
from ..hashing import canonical_order
from ..weights.safetensors_file import MAX_HEADER_SIZE, parse_safetensors_header
from .data import Batches
from .options import TrainSparseOptions
from .quant import exact_update, finetune
from .recipes import DigitsCNN, digits_scenario
from .channels import group_channels
from .fit import channels_to_drop, reset_channels
from .files import save_weights
from .patch_cost import PatchCost
from .probes import measure
from .sparse import changed_channels, check_budget, free_norm_bytes, free_norm_keys
from .tiny_updater import CHECKPOINT_FORMAT, update
from .trainer import Trainer, TrainerConfig, evaluate, init_distributed, set_seed, world_info
from .usercode import load_spec, user_code

__all__ = ["load_spec", "load_weights", "load_metadata", "save_weights", "train_sparse_run", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """'2MB' -> 2_000_000, '512KiB' -> 524288, '1000' -> 1000."""
    s = text.strip().lower().replace(" ", "")
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    num, unit = s[:i], s[i:]
    if not num or unit not in _UNITS:
        raise UsageError(f"--budget: cannot read {text!r} as a size (e.g. 2MB, 512KiB, 100000)")
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise UsageError(f"--budget: cannot read {text!r} as a size (e.g. 2MB, 512KiB, 100000)") from None
    if value <= 0:
        raise UsageError("--budget must be positive")
    return int(value)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WeightsError("no such file", path=str(path))
    try:
        return load_file(str(p))
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"not a readable safetensors file ({type(exc).__name__}: {exc})".splitlines()[0],
                           path=str(path)) from None


def load_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, in the file's own order (None when it has none)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) == 8:
                raw += f.read(min(struct.unpack("<Q", raw)[0], MAX_HEADER_SIZE + 1))
    except OSError as exc:
        raise WeightsError(f"cannot read it ({exc.strerror or exc})", path=str(path)) from None
    metadata, _ = parse_safetensors_header(raw, path=str(path))
    return metadata


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the model has (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} tensor(s) the model lacks (e.g. {extra[0]!r})")
        raise WeightsError("does not fit the model: " + "; ".join(parts), path=path)
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise WeightsError(f"shape {tuple(state[k].shape)} but the model expects {tuple(v.shape)}",
                               path=path, tensor=k)
    model.load_state_dict(state)


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in canonical_order(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ranks_agree(state: dict[str, torch.Tensor]) -> bool:
    import torch.distributed as dist

    digest = torch.tensor(list(bytes.fromhex(_state_digest(state))), dtype=torch.uint8)
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(bool(torch.equal(g, gathered[0])) for g in gathered)


def _metric(task: str, res: dict) -> float:
    return res["accuracy"] if task == "classification" else res["psnr"]


#: The student's settings for options left None: tuned on digits and checked on
#: mnist5k/shift, 3 seeds (benchmarks/RESULTS-tinyupdater.md, "What did not help": lr 3e-3 / 2e-2 / 4e-2
#: lost 1.6 / 2.0 / 3.0 points against 1e-2, KD weight 1 / 10 lost 1.1 / 1.5 against 3, temperature 1 / 4
#: lost 1.1 / 0.6 against 2).
STUDENT_TUNED: dict[str, Any] = {"lr": 1e-2, "kd_weight": 3.0, "kd_temperature": 2.0}
#: What the digits recipe was tuned with (benchmarks/RESULTS-tinyupdater.md), for options left None.
DIGITS_TUNED: dict[str, Any] = {"epochs": 20, "teacher_epochs": 20, **STUDENT_TUNED}
#: The teacher's (the full update's) learning rate while --lr is not given: a full fine-tune takes a
#: smaller step than the student, which has few channels to move.
TEACHER_LR = 3e-3
#: The digits recipe's M0, trained on the old digits.
DIGITS_M0 = {"epochs": 15, "batch_size": 64, "lr": 3e-3}
#: The share of channels allowed to change when neither --ratio nor --budget is given.
DEFAULT_RATIO = 0.1
#: ``--delta-bits`` when neither it nor ``--budget`` is given (``--method nnpatch``): at the same channels,
#: 4-bit deltas were as accurate as full-precision ones (+0.14 to +0.37 points on the five scenarios of
#: benchmarks/RESULTS-tinyupdater.md, 3 seeds each; -0.15 on digits, 3 seeds) in 26 to 50 % of the bytes.
DEFAULT_DELTA_BITS = 4


#: Samples per batch when the evaluation data is a dataset (a loader keeps its own batches).
EVAL_BATCH_SIZE = 256


def train_sparse_run(options: TrainSparseOptions | None = None, /, *,
                     log: Callable[[str], None] | None = None, **fields: Any) -> dict | None:
    """Everything ``nnpatch train-sparse`` does; returns the report (None on ranks > 0).

    Takes a :class:`TrainSparseOptions`, or its fields as keywords (with both, the keywords win).
    Raises :class:`~nnpatch.errors.BudgetMissedError` (with the report) when the patch written
    is larger than ``--budget``."""
    given = TrainSparseOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    budget_bytes = _refuse_bad_options(given)
    opts = _with_defaults(given, budget_bytes)
    out_path, patch_path = Path(opts.output), Path(opts.patch)

    distributed = init_distributed(opts.device)
    rank, world = world_info()
    if opts.recipe is not None:
        torch.set_num_threads(1)  # the recipe's models are tiny: threads only add overhead
    elif distributed and opts.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    say = log if (log is not None and rank == 0) else None
    set_seed(opts.seed)
    t0 = time.time()

    if opts.recipe is not None:
        _make_folders(opts)  # the recipe writes its base model first
        m0 = _digits_base(opts, rank, say)
    else:
        m0 = _user_base(opts)
    base_model, train_ds, eval_ds, base_path, base_file_state = m0
    groups = group_channels(base_model)
    free = free_norm_keys(groups, opts.norm_stats, base_file_state)
    cost, chosen = None, []
    if budget_bytes is not None:  # measured and refused now, not after the teacher has trained
        check_budget(budget_bytes, free_norm_bytes(free, base_file_state), opts.norm_stats)
        measured = {}
        for bits in ((None, 4) if given.delta_bits is None and opts.method != "tiny-updater"
                     else (opts.delta_bits,)):
            measured[bits] = measure(groups, base_file_state, free=free, delta_bits=bits,
                                     metadata=_metadata(opts, base_path), seed=opts.seed)
        if given.delta_bits is None and opts.method != "tiny-updater":
            opts = dataclasses.replace(opts, delta_bits=choose_bits(budget_bytes, measured))
            chosen.append("delta_bits")
            if say:
                shares = ", ".join(f"{_bits_name(b)} {100 * c.share_that_fits(budget_bytes):.0f} %"
                                   for b, c in measured.items())
                say(f"--budget {budget_bytes:,} bytes: {_bits_name(opts.delta_bits)} deltas (the share of the "
                    f"channels' bytes that fits: {shares})")
        cost = measured[opts.delta_bits]
        check_budget(budget_bytes, free_norm_bytes(free, base_file_state), opts.norm_stats, cost)
    meta = _checkpoint_meta(opts, budget_bytes, base_file_state, world) if opts.checkpoint else None
    resume = _read_checkpoint(opts.checkpoint, meta) if opts.resume and meta is not None else None
    teacher = None
    if opts.teacher_path:
        teacher = copy.deepcopy(base_model)
        load_into(teacher, load_weights(opts.teacher_path), opts.teacher_path)
    _make_folders(opts)
    if say and opts.checkpoint and resume is None:
        say(f"checkpoint: {opts.checkpoint}, written after every epoch (add --resume to go on from it)")
    cfg = TrainerConfig(**opts.trainer_fields(), budget_bytes=budget_bytes, selection=_selection(opts))
    teacher_lr = TEACHER_LR if given.lr is None else None
    with _running_user_code(opts, "training"):
        res = update(base_model.to(opts.device), train_ds, eval_ds, config=cfg, teacher=teacher,
                     teacher_epochs=opts.teacher_epochs, teacher_lr=teacher_lr, log=say,
                     checkpoint=opts.checkpoint, resume=resume, meta=meta, cost=cost,
                     lr_restart=opts.method != "tiny-updater")
    if opts.delta_bits is not None:  # quantization-aware deltas for the kept channels (trainer/quant.py)
        with _running_user_code(opts, "training"):
            finetune(res["student"], res["teacher"], res["base_state"], train_ds, cfg, opts.delta_bits, log=say)
    student = res["student"].to("cpu")
    teacher = res["teacher"].to("cpu")
    # the student in the base file's dtypes (frozen channels round-trip exactly)
    new_state = {k: v.detach().to(base_file_state[k].dtype) for k, v in student.state_dict().items()}
    deltas = None
    if opts.delta_bits is not None:  # the final weights by the qrows arithmetic, as the patch rebuilds them
        exact, deltas = exact_update(dict(student.named_parameters()), base_file_state, opts.delta_bits)
        new_state.update(exact)
        student.load_state_dict(new_state)
    check = changed_channels(new_state, base_file_state, res["sparse"].groups, ignore=res["sparse"].free_stats)
    changed = check.pop("changed_vector")
    agree = _ranks_agree(new_state) if distributed else True
    _teardown(distributed)  # all ranks leave together; rank 0 goes on alone
    if rank != 0:
        return None
    if not agree:
        raise TrainingError("ranks ended with different weights")
    task = opts.task
    with _running_user_code(opts, "evaluating"):
        metrics = {f"{name}_metric": _metric(task, evaluate(model, eval_ds, task))
                   for name, model in (("base", base_model.to("cpu")), ("teacher", teacher), ("student", student))}
    report: dict[str, Any] = {
        "recipe": opts.recipe, "task": task, "metric": "accuracy" if task == "classification" else "psnr",
        **metrics,
        "ratio": opts.ratio, "budget_bytes": budget_bytes,
        "channels_total": check["channels_total"], "channels_kept": res["sparse"].num_kept,
        "channels_changed": check["channels_changed"],
        "percent_channels_changed": 100.0 * check["channels_changed"] / max(1, check["channels_total"]),
        "params_total": check["params_total"], "params_changed": check["params_changed"],
        "percent_params_changed": 100.0 * check["params_changed"] / max(1, check["params_total"]),
        "norm_stats": opts.norm_stats, "norm_stats_changed": check["stats_changed"],
        "world_size": world, "ranks_agree": agree, "resumed": resume is not None,
        "delta_bits": opts.delta_bits, "chosen_by_budget": chosen, "method": opts.method,
    }
    _refuse_over_the_limit(check, opts.ratio)
    metadata = load_metadata(base_path)
    deltas_path = out_path.with_name(out_path.name.removesuffix(".safetensors") + ".deltas.safetensors")

    def write() -> int:
        save_weights(new_state, out_path, metadata=metadata)
        if deltas is not None:  # what `nnpatch diff BASE NEW --quantized DELTAS` rebuilds this very patch from
            save_quant_deltas(deltas_path, deltas)
        return diff(str(base_path), str(out_path), str(patch_path), quantized=deltas).patch_size

    report["patch_bytes"] = write()
    if budget_bytes is not None:
        report["estimated_update_bytes"] = res["sparse"].estimated_bytes(changed)
        report["channels_dropped_to_fit"] = 0
        if report["patch_bytes"] > budget_bytes:  # trained values compressed worse than the probes: shrink
            importance = res["sparse"].importance()
            for _ in range(_FIT_ROUNDS):
                if report["patch_bytes"] <= budget_bytes or int(changed.sum()) <= 1:
                    break  # an update that changes nothing is no answer: one channel over the budget is exit 1
                drop = channels_to_drop(changed, importance, cost, report["patch_bytes"] - budget_bytes)
                reset_channels(new_state, base_file_state, res["sparse"].groups, drop, res["sparse"].free_stats,
                               deltas)
                changed &= ~drop
                report["channels_dropped_to_fit"] += int(drop.sum())
                report["patch_bytes"] = write()
            if report["channels_dropped_to_fit"]:
                _recount(report, new_state, base_file_state, res["sparse"], student, eval_ds, opts)
        report["budget_met"] = report["patch_bytes"] <= budget_bytes
    report.update({"base": str(base_path), "output": str(out_path), "patch": str(patch_path),
                   "model_bytes": out_path.stat().st_size})
    if deltas is not None:
        report["deltas"] = str(deltas_path)
    report["seconds"] = round(time.time() - t0, 2)
    if budget_bytes is not None and not report["budget_met"]:
        raise BudgetMissedError(
            f"the patch is {report['patch_bytes']:,} bytes, over the --budget of {budget_bytes:,} bytes "
            f"({report['channels_changed']} changed channels after {report['channels_dropped_to_fit']} were dropped "
            f"to fit, estimated at {report['estimated_update_bytes']:,} bytes); {out_path} and {patch_path} were "
            f"written; try a larger --budget", report=report)
    return report


#: rounds of dropping channels and writing again before a patch over --budget is given up on
_FIT_ROUNDS = 8


def _recount(report: dict, new_state: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], sparse,
             student: nn.Module, eval_ds, opts: TrainSparseOptions) -> None:
    """The report's counts and the student's metric again, after channels were dropped to fit the budget."""
    check = changed_channels(new_state, base_state, sparse.groups, ignore=sparse.free_stats)
    check.pop("changed_vector")
    report.update({
        "channels_changed": check["channels_changed"],
        "percent_channels_changed": 100.0 * check["channels_changed"] / max(1, check["channels_total"]),
        "params_changed": check["params_changed"],
        "percent_params_changed": 100.0 * check["params_changed"] / max(1, check["params_total"]),
        "norm_stats_changed": check["stats_changed"]})
    student.load_state_dict(new_state)
    with _running_user_code(opts, "evaluating"):
        report["student_metric"] = _metric(opts.task, evaluate(student, eval_ds, opts.task))


def choose_bits(budget_bytes: int, measured: dict[int | None, PatchCost]) -> int | None:
    """The deltas ``--budget`` takes when ``--delta-bits`` is not given: full precision (None) where the
    whole full-precision update fits, else 4-bit codes.

    Measured on the digits recipe (benchmarks/RESULTS-tinyupdater.md, "Budget"): from 8 KB to 80 KB,
    4-bit deltas were the most accurate or within 0.22 points of 8-bit ones, and 3.1 to 8.7 points ahead of
    full precision up to 20 KB (7.3 at 11.4 KB, 3 seeds): at a fixed budget more channels at fewer bits buy more
    than fewer exact ones, even where 8-bit codes fit every channel (80 KB: 90.89 % at 4 bits, 90.44 % at 8)."""
    if None in measured and measured[None].share_that_fits(budget_bytes) >= 1.0:
        return None
    return 4


def _bits_name(bits: int | None) -> str:
    return "full-precision" if bits is None else f"{bits}-bit"


def _metadata(o: TrainSparseOptions, base_path: Path) -> dict[str, str] | None:
    """The metadata the output will carry: the base file's (the recipe's base has none, and on a rank
    other than 0 is not written yet)."""
    return None if o.recipe is not None else load_metadata(base_path)


@contextlib.contextmanager
def _running_user_code(o: TrainSparseOptions, doing: str):
    """Exceptions from the user's model or data, while ``doing``, as one line naming both SPECs."""
    if o.recipe is not None:
        yield
        return
    with user_code(f"{doing} --model {o.model_spec} on --data {o.data_spec}"):
        yield


def _make_folders(o: TrainSparseOptions) -> None:
    """Create the missing folders of every file the run writes."""
    for flag, path in (("-o", o.output), ("--patch", o.patch), ("--base-out", o.base_out),
                       ("--checkpoint", o.checkpoint)):
        if path is None:
            continue
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NnpatchIOError(f"{flag} {path}: cannot create folder {folder}: a file of that name is in the "
                                 f"way") from None
        except OSError as exc:
            raise NnpatchIOError(f"{flag} {path}: cannot create folder {folder}: {exc.strerror or exc}") from None


#: options that decide the result: a checkpoint is resumed only under the same values
_RESULT_OPTIONS = ("recipe", "model_spec", "data_spec", "ratio", "teacher_epochs", "epochs", "lr", "batch_size",
                   "task", "kd_temperature", "kd_weight", "norm_stats", "seed", "cost_factor", "delta_bits", "method")


def _selection(o: TrainSparseOptions) -> str:
    """The channel ranking: the published L1 rule under ``--method tiny-updater``, else the Trainer's default."""
    return "l1" if o.method == "tiny-updater" else TrainerConfig().selection


def _checkpoint_meta(o: TrainSparseOptions, budget_bytes: int | None, base_state: dict[str, torch.Tensor],
                     world: int) -> dict[str, Any]:
    meta: dict[str, Any] = {name: getattr(o, name) for name in _RESULT_OPTIONS}
    meta.update(budget_bytes=budget_bytes, world_size=world, base_digest=_state_digest(base_state),
                teacher_digest=_file_digest(o.teacher_path) if o.teacher_path else None,
                # not an option, but a default that has changed between versions: a run resumed under
                # another ranking would not be the run that was started
                selection=_selection(o))
    return meta


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checkpoint(path: str | None, meta: dict[str, Any]) -> dict:
    """The checkpoint at ``path``, refused unless the run that wrote it had these ``meta`` values."""
    assert path is not None  # _refuse_bad_options: --resume needs --checkpoint
    if not Path(path).is_file():
        raise UsageError(f"--resume: no checkpoint at {path} (leave --resume out to start afresh)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"not a readable train-sparse checkpoint ({type(exc).__name__}: {exc})".splitlines()[0],
                           path=path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError("not a train-sparse checkpoint", path=path)
    old = dict(state.get("meta") or {})
    old.setdefault("method", "nnpatch")  # written before --method: the rule was nnpatch's
    if "selection" not in old:  # written before the ranking was recorded: its trainer config has it
        trainer = state.get("trainer")
        config = trainer.get("config") if isinstance(trainer, dict) else None
        old["selection"] = config.get("selection") if isinstance(config, dict) else None
    names = {"base_digest": "--base", "teacher_digest": "--teacher", "world_size": "ranks (torchrun)",
             "budget_bytes": "--budget", "model_spec": "--model", "data_spec": "--data",
             "selection": "channel ranking (an earlier nnpatch's default)"}
    for key, value in meta.items():
        if old.get(key) != value:
            flag = names.get(key, "--" + key.replace("_", "-"))
            shown = "another file" if key.endswith("digest") else f"{old.get(key)!r}, this run has {value!r}"
            raise UsageError(f"--resume: {path} was written by a run with other {flag} ({shown}); resume with "
                             f"the options it was started with, or leave --resume out to start afresh")
    return state


def _refuse_bad_options(o: TrainSparseOptions) -> int | None:
    """Raise the usage error of options that cannot run together; returns ``--budget`` in bytes."""
    if o.recipe is not None and (o.model_spec or o.data_spec or o.base):
        raise UsageError("--recipe cannot be combined with --model/--data/--base")
    if o.recipe is None and not (o.model_spec and o.data_spec and o.base):
        raise UsageError("give --recipe, or all of --model, --data and --base")
    if o.recipe is not None and o.recipe != "digits":
        raise UsageError(f"unknown recipe {o.recipe!r}; known: digits")
    if o.teacher_path and o.teacher_epochs is not None:
        raise UsageError("--teacher and --teacher-epochs exclude each other")
    if o.budget is not None and o.ratio is not None:
        raise UsageError("--ratio and --budget exclude each other")
    budget_bytes = parse_bytes(o.budget) if o.budget is not None else None
    if o.ratio is not None and not 0.0 < o.ratio <= 1.0:
        raise UsageError(f"--ratio must be in (0, 1], got {o.ratio}")
    for name, val in (("--epochs", o.epochs), ("--teacher-epochs", o.teacher_epochs),
                      ("--batch-size", o.batch_size)):
        if val is not None and val < 1:
            raise UsageError(f"{name} must be >= 1")
    if o.lr is not None and not o.lr > 0:
        raise UsageError("--lr must be > 0")
    if o.kd_temperature is not None and o.kd_temperature <= 0:
        raise UsageError("--kd-temperature must be > 0")
    if o.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if o.delta_bits is not None and str(o.delta_bits) not in ("8", "4", "off"):
        raise UsageError(f"--delta-bits must be 8, 4 or off, got {o.delta_bits}")
    if o.method == "tiny-updater" and (o.norm_stats not in (None, "frozen") or o.delta_bits not in (None, "off")):
        raise UsageError("--method tiny-updater is the published rule (frozen norm layers, full-precision values): "
                         "leave out --norm-stats and --delta-bits, or use --method nnpatch")
    if o.resume and not o.checkpoint:
        raise UsageError("--resume needs --checkpoint FILE (the file to go on from)")
    if o.checkpoint and Path(o.checkpoint).resolve() in {Path(p).resolve() for p in (o.output, o.patch)}:
        raise UsageError("--checkpoint must not name the output or the patch")
    if o.teacher_path and not Path(o.teacher_path).is_file():
        raise WeightsError("no such file", path=o.teacher_path)
    if o.recipe == "digits" and o.task not in (None, "classification"):
        raise UsageError("--recipe digits is a classification task")
    return budget_bytes


def _with_defaults(o: TrainSparseOptions, budget_bytes: int | None) -> TrainSparseOptions:
    """``o`` with the options left None filled in: the recipe's tuned values (:data:`DIGITS_TUNED`), else
    the student's (:data:`STUDENT_TUNED`), then the Trainer's defaults."""
    tuned = DIGITS_TUNED if o.recipe is not None else STUDENT_TUNED
    trainer = TrainerConfig()
    filled = {name: tuned.get(name, getattr(trainer, name))
              for name in ("epochs", "batch_size", "lr", "task", "kd_temperature", "kd_weight")
              if getattr(o, name) is None}
    o = dataclasses.replace(o, **filled)
    teacher_epochs = o.teacher_epochs if o.teacher_epochs is not None else tuned.get("teacher_epochs", o.epochs)
    ratio = o.ratio if o.ratio is not None or budget_bytes is not None else DEFAULT_RATIO
    bits = int(o.delta_bits) if o.delta_bits not in (None, "off") else None  # "8" from the command line
    if o.delta_bits is None and o.method != "tiny-updater" and budget_bytes is None:
        bits = DEFAULT_DELTA_BITS  # with --budget, train_sparse_run picks the width (choose_bits)
    return dataclasses.replace(o, teacher_epochs=teacher_epochs, ratio=ratio, delta_bits=bits)


class _M0(NamedTuple):
    """The pre-update model, the update's data, and the weights file the patch starts from."""

    model: nn.Module
    train_ds: Any
    eval_ds: Any
    path: Path
    file_state: dict[str, torch.Tensor]


def _digits_base(o: TrainSparseOptions, rank: int, say: Callable[[str], None] | None) -> _M0:
    """M0 of the digits recipe, trained on the old digits and written beside ``-o`` (or to ``--base-out``)."""
    sc = digits_scenario(seed=o.seed)
    base_model = DigitsCNN(sc["num_classes"])
    if say:
        say("training v1 (M0) on the old digits")
    Trainer(TrainerConfig(**DIGITS_M0, seed=o.seed, device=o.device), base_model, sc["old_train"]).run()
    base_model = base_model.to("cpu").eval()
    out_path = Path(o.output)
    stem = out_path.name.removesuffix(".safetensors")
    base_path = Path(o.base_out) if o.base_out else out_path.with_name(stem + ".base.safetensors")
    if base_path.resolve() == out_path.resolve():
        raise UsageError("--base-out and -o name the same file")
    if rank == 0:
        save_weights(base_model.state_dict(), base_path)
    base_file_state = {k: v.clone() for k, v in base_model.state_dict().items()}
    return _M0(base_model, sc["new_train"], sc["new_test"], base_path, base_file_state)


def _user_base(o: TrainSparseOptions) -> _M0:
    """M0 from ``--model``, ``--data`` and ``--base``."""
    base_model = load_spec(o.model_spec, "--model")
    if not isinstance(base_model, nn.Module):
        raise UserCodeError(f"--model {o.model_spec}: gave a {type(base_model).__name__}, not a torch.nn.Module")
    data = load_spec(o.data_spec, "--data")
    if not (isinstance(data, tuple | list) and len(data) == 2):
        shown = f"a {len(data)}-item {type(data).__name__}" if isinstance(data, tuple | list) else \
            f"a {type(data).__name__}"
        raise UserCodeError(f"--data {o.data_spec}: gave {shown}, expected a (train_loader, eval_loader) pair")
    label = f"--data {o.data_spec}"
    train = Batches(data[0], batch_size=o.batch_size, seed=o.seed, what="train", spec=label)
    evaluation = Batches(data[1], batch_size=EVAL_BATCH_SIZE, seed=o.seed, what="eval", spec=label)
    base_path = Path(o.base)
    base_file_state = load_weights(base_path)
    load_into(base_model, base_file_state, str(base_path))
    base_model.eval()
    return _M0(base_model, train, evaluation, base_path, base_file_state)


def _refuse_over_the_limit(check: dict, ratio: float | None) -> None:
    """Recounted from the saved bytes, the changed channels must still fit ``ratio``."""
    limit = None if ratio is None else math.floor(ratio * check["channels_total"] + 1e-9)
    if limit is not None and check["channels_changed"] > limit:
        raise TrainingError(f"{check['channels_changed']} channels changed, over the {limit} allowed")


def _teardown(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
