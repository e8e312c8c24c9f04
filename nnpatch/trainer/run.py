"""The ``train-sparse`` pipeline: teacher, distilled channel-sparse student, files, patch.

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
what fits ``--budget`` bytes estimated as raw bytes x 0.9); (4) the student is
saved in the base file's dtypes (frozen channels round-trip bit-exactly), with
``num_batches_tracked`` and every other non-float tensor reset to M0's value so
they never count as a change; (5) the changed channels are recounted from the
bytes and checked against the target; (6) ``nnpatch.diff(base, -o, --patch)``.
Under ``torchrun`` every rank trains (DDP, gloo on CPU); the ranks' final weights
are compared by digest and rank 0 writes the files.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import MissingDependencyError, TrainingError, UsageError, WeightsError
from ..hashing import canonical_order
from .recipes import DigitsCNN, digits_scenario
from .sparse import changed_channels
from .tiny_updater import update
from .trainer import Trainer, TrainerConfig, evaluate, init_distributed, set_seed, world_info

__all__ = ["load_spec", "load_weights", "save_weights", "update", "train_sparse_run", "parse_bytes"]

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


def train_sparse_run(*, recipe: str | None, model_spec: str | None, data_spec: str | None,
                     base: str | None, ratio: float | None, budget: str | None, teacher_path: str | None,
                     teacher_epochs: int | None, epochs: int | None, lr: float | None, batch_size: int | None,
                     task: str | None, kd_temperature: float | None, kd_weight: float | None, seed: int,
                     device: str, norm_stats: str = "frozen",
                     output: str, patch: str, base_out: str | None = None,
                     cost_factor: float = 0.9, log: Callable[[str], None] | None = None) -> dict | None:
    """Everything ``nnpatch train-sparse`` does; returns the report (None on ranks > 0)."""
    if recipe is not None and (model_spec or data_spec or base):
        raise UsageError("--recipe cannot be combined with --model/--data/--base")
    if recipe is None and not (model_spec and data_spec and base):
        raise UsageError("give --recipe, or all of --model, --data and --base")
    if recipe is not None and recipe != "digits":
        raise UsageError(f"unknown recipe {recipe!r}; known: digits")
    if teacher_path and teacher_epochs is not None:
        raise UsageError("--teacher and --teacher-epochs exclude each other")
    if budget is not None and ratio is not None:
        raise UsageError("--ratio and --budget exclude each other")
    budget_bytes = parse_bytes(budget) if budget is not None else None
    if budget_bytes is None:
        ratio = 0.1 if ratio is None else ratio
        if not 0.0 < ratio <= 1.0:
            raise UsageError(f"--ratio must be in (0, 1], got {ratio}")
    for name, val in (("--epochs", epochs), ("--teacher-epochs", teacher_epochs), ("--batch-size", batch_size)):
        if val is not None and val < 1:
            raise UsageError(f"{name} must be >= 1")
    if lr is not None and not lr > 0:
        raise UsageError("--lr must be > 0")
    tuned = recipe is not None  # the recipe's tuned defaults (benchmarks/RESULTS-tinyupdater.md)
    lr_given = lr
    lr = lr if lr is not None else (1e-2 if tuned else 3e-3)
    kd_weight = kd_weight if kd_weight is not None else (3.0 if tuned else 1.0)
    kd_temperature = kd_temperature if kd_temperature is not None else (2.0 if tuned else 4.0)
    if kd_temperature <= 0:
        raise UsageError("--kd-temperature must be > 0")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    out_path = Path(output)
    patch_path = Path(patch)
    for p in (out_path, patch_path):
        if not p.parent.exists() and str(p.parent) not in ("", "."):
            raise UsageError(f"folder {p.parent} does not exist")
    if teacher_path and not Path(teacher_path).is_file():
        raise WeightsError("no such file", path=teacher_path)

    distributed = init_distributed(device)
    rank, world = world_info()
    if recipe is not None:
        torch.set_num_threads(1)  # the recipe's models are tiny: threads only add overhead
    elif distributed and device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    say = log if (log is not None and rank == 0) else None
    set_seed(seed)
    t0 = time.time()

    if recipe == "digits":
        task = task or "classification"
        if task != "classification":
            raise UsageError("--recipe digits is a classification task")
        sc = digits_scenario(seed=seed)
        base_model = DigitsCNN(sc["num_classes"])
        m0_cfg = TrainerConfig(epochs=15, batch_size=64, lr=3e-3, seed=seed, device=device)
        if say:
            say("training v1 (M0) on the old digits")
        Trainer(m0_cfg, base_model, sc["old_train"]).run()
        base_model = base_model.to("cpu").eval()
        stem = out_path.name[:-len(".safetensors")] if out_path.name.endswith(".safetensors") else out_path.name
        base_path = Path(base_out) if base_out else out_path.with_name(stem + ".base.safetensors")
        if base_path.resolve() == out_path.resolve():
            raise UsageError("--base-out and -o name the same file")
        if rank == 0:
            save_weights(base_model.state_dict(), base_path)
        train_ds, eval_ds = sc["new_train"], sc["new_test"]
        base_file_state = {k: v.clone() for k, v in base_model.state_dict().items()}
        epochs = epochs or 20
        teacher_epochs_default = 20
    else:
        assert model_spec and data_spec and base
        task = task or "classification"
        base_model = load_spec(model_spec, "--model")
        if not isinstance(base_model, nn.Module):
            raise UsageError(f"--model {model_spec!r} gave {type(base_model).__name__}, not a torch.nn.Module")
        data = load_spec(data_spec, "--data")
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise UsageError(f"--data {data_spec!r} must give a (train_dataset, eval_dataset) pair")
        train_ds, eval_ds = data
        base_path = Path(base)
        base_file_state = load_weights(base_path)
        load_into(base_model, base_file_state, str(base_path))
        base_model.eval()
        epochs = epochs or 10
        teacher_epochs_default = epochs

    teacher = None
    if teacher_path:
        teacher = copy.deepcopy(base_model)
        load_into(teacher, load_weights(teacher_path), teacher_path)
    cfg = TrainerConfig(epochs=epochs, batch_size=batch_size or 64, lr=lr, task=task,
                        kd_temperature=kd_temperature, kd_weight=kd_weight, ratio=ratio,
                        budget_bytes=budget_bytes, cost_factor=cost_factor, seed=seed, device=device,
                        norm_stats=norm_stats)
    res = update(base_model.to(device), train_ds, eval_ds, config=cfg, teacher=teacher,
                 teacher_epochs=teacher_epochs or teacher_epochs_default,
                 teacher_lr=3e-3 if tuned and lr_given is None else None, log=say)
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
    base_model = base_model.to("cpu")
    report: dict[str, Any] = {
        "recipe": recipe, "task": task, "metric": "accuracy" if task == "classification" else "psnr",
        "base_metric": _metric(task, evaluate(base_model, eval_ds, task)),
        "teacher_metric": _metric(task, evaluate(teacher, eval_ds, task)),
        "student_metric": _metric(task, evaluate(student, eval_ds, task)),
        "ratio": ratio, "budget_bytes": budget_bytes,
        "channels_total": check["channels_total"], "channels_kept": res["sparse"].num_kept,
        "channels_changed": check["channels_changed"],
        "percent_channels_changed": 100.0 * check["channels_changed"] / max(1, check["channels_total"]),
        "params_total": check["params_total"], "params_changed": check["params_changed"],
        "percent_params_changed": 100.0 * check["params_changed"] / max(1, check["params_total"]),
        "norm_stats": norm_stats, "norm_stats_changed": check["stats_changed"],
        "world_size": world, "ranks_agree": agree,
    }
    limit = None if ratio is None else math.floor(ratio * check["channels_total"] + 1e-9)
    if limit is not None and check["channels_changed"] > limit:
        raise TrainingError(f"{check['channels_changed']} channels changed, over the {limit} allowed")
    save_weights(new_state, out_path)
    report.update({"base": str(base_path), "output": str(out_path), "patch": str(patch_path),
                   "model_bytes": out_path.stat().st_size})
    make = core_function("diff")
    if make is None:
        raise MissingDependencyError(f"nnpatch.diff is not available: {out_path} written, no patch made")
    result = make(str(base_path), str(out_path), str(patch_path))
    report["patch_bytes"] = int(getattr(result, "patch_size", patch_path.stat().st_size))
    if budget_bytes is not None:
        report["budget_met"] = report["patch_bytes"] <= budget_bytes
        report["estimated_update_bytes"] = int(res["sparse"].channel_bytes[changed].sum() * cost_factor)
    report["seconds"] = round(time.time() - t0, 2)
    return report


def core_function(name: str) -> Callable | None:
    """``nnpatch.diff`` / ``nnpatch.apply`` from the core, whether exported as a function or a module."""
    try:
        import nnpatch
    except ImportError:
        return None
    obj = getattr(nnpatch, name, None)
    if obj is None:
        try:
            obj = importlib.import_module(f"nnpatch.{name}")
        except ImportError:
            return None
    if not callable(obj):
        obj = getattr(obj, name, None)
    return obj if callable(obj) else None


def _teardown(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
