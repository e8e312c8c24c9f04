"""The ``train-sparse`` plumbing around the Tiny Updater (``tiny_updater.update``): M0, files, ranks, patch.

``--model`` / ``--data`` SPEC: ``module.path:name`` or ``path/to/file.py:name``.
``name`` is looked up in the module; if it is callable (and not already an
``nn.Module``) it is called with no arguments.  The model spec must give an
``nn.Module`` (architecture; its weights are replaced by ``--base``); the data
spec must give a ``(train_dataset, eval_dataset)`` pair of map-style datasets
yielding ``(input, target)`` pairs (class indices for classification, tensors
shaped like the output for regression).

What the command does: (1) M0 = ``--base`` loaded into the ``--model`` architecture
(with ``--recipe digits``: trained on the old digits and written to
``<stem>.base.safetensors`` beside ``-o`` or to ``--base-out``); (2) a teacher =
M0 fine-tuned with every parameter free for ``--teacher-epochs`` (or ``--teacher``);
(3) the student = M0 trained with task loss + ``--kd-weight`` x KD under a
channel-sparse update (cubic schedule down to ``--ratio`` of the channels, or to
what fits ``--budget`` bytes estimated as raw bytes x 0.9) -- (2) and (3) are
``tiny_updater.update``; (4) the student is
saved in the base file's dtypes (frozen channels round-trip bit-exactly), with
``num_batches_tracked`` and every other non-float tensor reset to M0's value so
they never count as a change; (5) the changed channels are recounted from the
bytes and checked against the target; (6) ``nnpatch.diff(base, -o, --patch)``.
Under ``torchrun`` every rank trains (DDP, gloo on CPU); the ranks' final weights
are compared by digest and rank 0 writes the files.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

import nnpatch

from ..atomic import atomic_path
from ..errors import TrainingError, UsageError, WeightsError
from ..hashing import canonical_order
from .options import TrainSparseOptions
from .recipes import DigitsCNN, digits_scenario
from .sparse import changed_channels
from .tiny_updater import update
from .trainer import Trainer, TrainerConfig, evaluate, init_distributed, set_seed, world_info

__all__ = ["load_spec", "load_weights", "save_weights", "train_sparse_run", "parse_bytes", "core_function"]

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


def load_spec(spec: str, what: str) -> Any:
    """Resolve ``module:name`` or ``file.py:name`` (calling ``name`` if it is a plain callable)."""
    if ":" not in spec:
        raise UsageError(f"{what} {spec!r}: expected module.path:callable or file.py:callable")
    mod_part, _, name = spec.rpartition(":")
    if not mod_part or not name:
        raise UsageError(f"{what} {spec!r}: expected module.path:callable or file.py:callable")
    try:
        if mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part:
            path = Path(mod_part)
            if not path.is_file():
                raise UsageError(f"{what} {spec!r}: no such file {mod_part}")
            mod_name = f"_nnpatch_spec_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            if spec_obj is None or spec_obj.loader is None:
                raise UsageError(f"{what} {spec!r}: cannot load {mod_part}")
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_part)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report in one line
        raise UsageError(f"{what} {spec!r}: importing {mod_part} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, name):
        raise UsageError(f"{what} {spec!r}: {mod_part} has no attribute {name!r}")
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, nn.Module):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{what} {spec!r}: calling {name}() failed: {type(exc).__name__}: {exc}") from None
    return obj


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


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically: readers see the old file or the new one."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    # mode 0o666 less the umask, as any newly created file gets (atomic_path's default is 0o644)
    with atomic_path(path, mode=0o666) as tmp:
        save_file(tensors, tmp, metadata=metadata)


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


#: What the digits recipe was tuned with (benchmarks/RESULTS-tinyupdater.md), for options left None.
DIGITS_TUNED: dict[str, Any] = {"epochs": 20, "teacher_epochs": 20, "lr": 1e-2, "kd_weight": 3.0,
                                "kd_temperature": 2.0}
#: The digits teacher's (the full update's) tuned learning rate, used while --lr is not given.
DIGITS_TEACHER_LR = 3e-3
#: The digits recipe's M0, trained on the old digits.
DIGITS_M0 = {"epochs": 15, "batch_size": 64, "lr": 3e-3}
#: The share of channels allowed to change when neither --ratio nor --budget is given.
DEFAULT_RATIO = 0.1


def train_sparse_run(options: TrainSparseOptions | None = None, /, *,
                     log: Callable[[str], None] | None = None, **fields: Any) -> dict | None:
    """Everything ``nnpatch train-sparse`` does; returns the report (None on ranks > 0).

    Takes a :class:`TrainSparseOptions`, or its fields as keywords (with both, the keywords win)."""
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

    m0 = _digits_base(opts, rank, say) if opts.recipe is not None else _user_base(opts)
    base_model, train_ds, eval_ds, base_path, base_file_state = m0
    teacher = None
    if opts.teacher_path:
        teacher = copy.deepcopy(base_model)
        load_into(teacher, load_weights(opts.teacher_path), opts.teacher_path)
    cfg = TrainerConfig(**opts.trainer_fields(), budget_bytes=budget_bytes)
    teacher_lr = DIGITS_TEACHER_LR if opts.recipe is not None and given.lr is None else None
    res = update(base_model.to(opts.device), train_ds, eval_ds, config=cfg, teacher=teacher,
                 teacher_epochs=opts.teacher_epochs, teacher_lr=teacher_lr, log=say)
    student = res["student"].to("cpu")
    teacher = res["teacher"].to("cpu")
    # the student in the base file's dtypes (frozen channels round-trip exactly)
    new_state = {k: v.detach().to(base_file_state[k].dtype) for k, v in student.state_dict().items()}
    check = changed_channels(new_state, base_file_state, res["sparse"].groups, ignore=res["sparse"].free_stats)
    changed = check.pop("changed_vector")
    agree = _ranks_agree(new_state) if distributed else True
    _teardown(distributed)  # all ranks leave together; rank 0 goes on alone
    if rank != 0:
        return None
    if not agree:
        raise TrainingError("ranks ended with different weights")
    task = opts.task
    report: dict[str, Any] = {
        "recipe": opts.recipe, "task": task, "metric": "accuracy" if task == "classification" else "psnr",
        "base_metric": _metric(task, evaluate(base_model.to("cpu"), eval_ds, task)),
        "teacher_metric": _metric(task, evaluate(teacher, eval_ds, task)),
        "student_metric": _metric(task, evaluate(student, eval_ds, task)),
        "ratio": opts.ratio, "budget_bytes": budget_bytes,
        "channels_total": check["channels_total"], "channels_kept": res["sparse"].num_kept,
        "channels_changed": check["channels_changed"],
        "percent_channels_changed": 100.0 * check["channels_changed"] / max(1, check["channels_total"]),
        "params_total": check["params_total"], "params_changed": check["params_changed"],
        "percent_params_changed": 100.0 * check["params_changed"] / max(1, check["params_total"]),
        "norm_stats": opts.norm_stats, "norm_stats_changed": check["stats_changed"],
        "world_size": world, "ranks_agree": agree,
    }
    _refuse_over_the_limit(check, opts.ratio)
    save_weights(new_state, out_path)
    report.update({"base": str(base_path), "output": str(out_path), "patch": str(patch_path),
                   "model_bytes": out_path.stat().st_size})
    report["patch_bytes"] = nnpatch.diff(str(base_path), str(out_path), str(patch_path)).patch_size
    if budget_bytes is not None:
        report["budget_met"] = report["patch_bytes"] <= budget_bytes
        report["estimated_update_bytes"] = int(res["sparse"].channel_bytes[changed].sum() * opts.cost_factor)
    report["seconds"] = round(time.time() - t0, 2)
    return report


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
    for p in (Path(o.output), Path(o.patch)):
        if not p.parent.exists() and str(p.parent) not in ("", "."):
            raise UsageError(f"folder {p.parent} does not exist")
    if o.teacher_path and not Path(o.teacher_path).is_file():
        raise WeightsError("no such file", path=o.teacher_path)
    if o.recipe == "digits" and o.task not in (None, "classification"):
        raise UsageError("--recipe digits is a classification task")
    return budget_bytes


def _with_defaults(o: TrainSparseOptions, budget_bytes: int | None) -> TrainSparseOptions:
    """``o`` with the options left None filled in: the recipe's tuned values, else the Trainer's defaults."""
    tuned = DIGITS_TUNED if o.recipe is not None else {}
    trainer = TrainerConfig()
    filled = {name: tuned.get(name, getattr(trainer, name))
              for name in ("epochs", "batch_size", "lr", "task", "kd_temperature", "kd_weight")
              if getattr(o, name) is None}
    o = dataclasses.replace(o, **filled)
    teacher_epochs = o.teacher_epochs if o.teacher_epochs is not None else tuned.get("teacher_epochs", o.epochs)
    ratio = o.ratio if o.ratio is not None or budget_bytes is not None else DEFAULT_RATIO
    return dataclasses.replace(o, teacher_epochs=teacher_epochs, ratio=ratio)


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
        raise UsageError(f"--model {o.model_spec!r} gave {type(base_model).__name__}, not a torch.nn.Module")
    data = load_spec(o.data_spec, "--data")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise UsageError(f"--data {o.data_spec!r} must give a (train_dataset, eval_dataset) pair")
    base_path = Path(o.base)
    base_file_state = load_weights(base_path)
    load_into(base_model, base_file_state, str(base_path))
    base_model.eval()
    train_ds, eval_ds = data
    return _M0(base_model, train_ds, eval_ds, base_path, base_file_state)


def _refuse_over_the_limit(check: dict, ratio: float | None) -> None:
    """Recounted from the saved bytes, the changed channels must still fit ``ratio``."""
    limit = None if ratio is None else math.floor(ratio * check["channels_total"] + 1e-9)
    if limit is not None and check["channels_changed"] > limit:
        raise TrainingError(f"{check['channels_changed']} channels changed, over the {limit} allowed")


def core_function(name: str) -> Callable | None:
    """``nnpatch.diff`` / ``nnpatch.apply`` (any function of the core) by name; None if there is none."""
    obj = getattr(nnpatch, name, None)
    return obj if callable(obj) else None


def _teardown(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
