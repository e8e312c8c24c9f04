"""The Tiny Updater (Zhang and Ma, ICCV 2023): update a model so that only a few channels change.

From the old model M0, (1) a teacher is fine-tuned with every parameter free;
(2) a student, also starting from M0, is trained with the task loss plus a
distillation term towards the teacher; (3) on a schedule, the student's channels
whose parameters moved least from M0 (the paper: by L1 distance) are reset to M0's values and
frozen, until only the target share (10-20 % of the output channels) or what
fits a byte budget is left free.  A patch from M0 to the student then carries
the changed channels only.

Two choices differ from the paper, both measured (benchmarks/RESULTS-tinyupdater.md,
"Closing the gap"): channels are ranked by Fisher-weighted movement
(``selection="fisher"``, see :mod:`nnpatch.trainer.sparse`) rather than by L1
distance, and the student's cosine learning rate restarts from its peak when the
prune ramp ends (``lr_restart``), so the channels left free re-adapt at full speed
after their neighbours were reset.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Any, Callable

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import UsageError
from .patch_cost import PatchCost
from .progress import Progress
from .trainer import Trainer, TrainerConfig, set_seed, world_info

__all__ = ["update", "StudentTrainer", "CHECKPOINT_FORMAT"]

#: the ``format`` entry of a train-sparse checkpoint (see :func:`update`)
CHECKPOINT_FORMAT = "nnpatch train-sparse checkpoint 1"


def update(base_model: nn.Module, train_ds, eval_ds, *, config: TrainerConfig,
           teacher: nn.Module | None = None, teacher_epochs: int | None = None,
           teacher_lr: float | None = None, kd: bool = True,
           log: Callable[[str], None] | None = None, checkpoint: str | os.PathLike | None = None,
           resume: dict | None = None, meta: dict | None = None, lr_restart: bool = True,
           cost: PatchCost | None = None) -> dict:
    """Run the Tiny Updater on ``base_model`` (M0, left untouched).

    Trains a fully-updated teacher (unless given) for ``teacher_epochs``, then a
    student from M0 with task loss + KD (if ``kd``) under ``config``'s sparse
    target.  ``train_ds`` and ``eval_ds``: datasets or loaders (:mod:`nnpatch.trainer.data`).
    With ``log``, one line per epoch (:class:`~nnpatch.trainer.progress.Progress`: loss,
    the metric on ``eval_ds``, the free channels, the time left).

    ``checkpoint``: a file written (atomically) after every epoch of either phase:
    a dict loadable with ``torch.load(weights_only=True)`` holding ``format``
    (:data:`CHECKPOINT_FORMAT`), ``meta`` (the caller's, e.g. the options that
    decide the result), ``phase`` ("teacher" or "student"), ``trainer`` (that
    phase's :meth:`Trainer.checkpoint`) and ``teacher`` (the finished teacher's
    state dict, in the student phase).  ``resume``: such a dict; the run goes on
    from it and ends exactly as the uninterrupted run would have.

    ``lr_restart``: the student's cosine learning rate starts again from ``config.lr`` at the
    last prune event and decays to 0 over the steps left (:class:`StudentTrainer`); False keeps
    one cosine over the whole run.

    ``cost``: what a patch of the model costs (:func:`nnpatch.trainer.patch_cost.measure`), for a
    ``config.budget_bytes`` counted in the writer's bytes.

    Returns ``{"student", "teacher", "base_state", "sparse", "check", "seconds"}``."""
    t0 = time.time()
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    rank, _ = world_info()
    device = str(next(iter(base_model.parameters())).device) if any(True for _ in base_model.parameters()) \
        else "cpu"
    phases = {"teacher": teacher_epochs or config.epochs, "student": config.epochs}
    progress = Progress(log, phases, eval_data=eval_ds, task=config.task, device=device) if log else None
    if resume is not None and resume.get("phase") not in ("teacher", "student"):
        raise UsageError(f"checkpoint phase {resume.get('phase')!r} is neither teacher nor student")

    def saver(phase: str, teacher_state: dict | None = None) -> Callable[[Trainer], None]:
        def save(tr: Trainer) -> None:
            if checkpoint is not None and rank == 0:
                _save_checkpoint(checkpoint, {"format": CHECKPOINT_FORMAT, "meta": meta or {}, "phase": phase,
                                              "trainer": tr.checkpoint(), "teacher": teacher_state})
        return save

    if teacher is None and kd:
        if resume is not None and resume["phase"] == "student":
            teacher = copy.deepcopy(base_model)
            teacher.load_state_dict(resume["teacher"])
            if progress:
                progress.skip("teacher", f"finished before the checkpoint {os.fspath(checkpoint or '')}".rstrip())
        else:
            teacher = _train_teacher(base_model, train_ds, config, teacher_epochs, teacher_lr, progress=progress,
                                     on_epoch_end=saver("teacher"), resume=resume, checkpoint=checkpoint)
    elif progress:
        progress.skip("teacher", "given (--teacher)" if teacher is not None else "none (no distillation)")
    set_seed(config.seed + 2)
    student = copy.deepcopy(base_model)
    trainer_cls = StudentTrainer if lr_restart else Trainer
    tr = trainer_cls(config, student, train_ds, base_state=base_state, teacher=teacher if kd else None, cost=cost)
    student_resume = resume["trainer"] if resume is not None and resume["phase"] == "student" else None
    if student_resume is not None:
        tr.load_checkpoint(student_resume)
    if progress:
        progress.begin("student", tr, resumed_from=os.fspath(checkpoint) if student_resume is not None else None)
    teacher_state = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()} \
        if teacher is not None and checkpoint is not None else None
    tr.add_callback("on_epoch_end", saver("student", teacher_state))
    tr.run()
    check = None
    if tr.sparse is not None:
        tr.sparse.remove_hooks()
        check = tr.sparse.verify(base_state)
    return {"student": student, "teacher": teacher, "base_state": base_state, "sparse": tr.sparse,
            "check": check, "seconds": time.time() - t0}


class StudentTrainer(Trainer):
    """A :class:`Trainer` whose cosine learning rate restarts at the end of the prune ramp.

    Up to the last prune event the learning rate is the Trainer's (cosine over the whole
    run); from there it is ``lr * (1 + cos(pi * (step - end) / (total - end))) / 2``.  With no
    ramp (a full update, ``schedule="start"``) or ``lr_schedule="constant"`` it is the
    Trainer's.  A function of the step only, so resumed runs stay exact."""

    def _lr_at(self, step: int) -> float:
        c = self.config
        total = max(1, self.total_steps())
        if self.sparse is None or c.lr_schedule == "constant" or (c.warmup_steps and step < c.warmup_steps):
            return super()._lr_at(step)
        end = self.sparse.plan(total)[-1][0]
        if step < end or end <= 0 or end >= total:
            return super()._lr_at(step)
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * (step - end) / (total - end)))


def _train_teacher(base_model: nn.Module, train_ds, config: TrainerConfig, epochs: int | None,
                   lr: float | None, *, progress: Progress | None = None,
                   on_epoch_end: Callable[[Trainer], None] | None = None, resume: dict | None = None,
                   checkpoint: Any = None) -> nn.Module:
    """M0 fine-tuned with every parameter free (the full update), under ``config`` otherwise."""
    set_seed(config.seed + 1)
    teacher = copy.deepcopy(base_model)
    full = dataclasses.replace(config, ratio=None, budget_bytes=None, epochs=epochs or config.epochs,
                               lr=lr or config.lr, checkpoint_path=None)
    tr = Trainer(full, teacher, train_ds)
    if resume is not None:
        tr.load_checkpoint(resume["trainer"])
    if progress:
        progress.begin("teacher", tr, resumed_from=os.fspath(checkpoint) if resume is not None else None)
    if on_epoch_end is not None:
        tr.add_callback("on_epoch_end", on_epoch_end)
    tr.run()
    return teacher


def _save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    with atomic_path(path, mode=0o666) as tmp:  # the umask decides, as for torch.save alone
        torch.save(payload, tmp)
