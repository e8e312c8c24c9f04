"""The Tiny Updater (Zhang and Ma, ICCV 2023): update a model so that only a few channels change.

From the old model M0, (1) a teacher is fine-tuned with every parameter free;
(2) a student, also starting from M0, is trained with the task loss plus a
distillation term towards the teacher; (3) on a schedule, the student's channels
whose parameters moved least from M0 (L1 distance) are reset to M0's values and
frozen, until only the target share (10-20 % of the output channels) or what
fits a byte budget is left free.  A patch from M0 to the student then carries
the changed channels only.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable

from torch import nn

from .trainer import Trainer, TrainerConfig, set_seed

__all__ = ["update"]


def update(base_model: nn.Module, train_ds, eval_ds, *, config: TrainerConfig,
           teacher: nn.Module | None = None, teacher_epochs: int | None = None,
           teacher_lr: float | None = None, kd: bool = True,
           log: Callable[[str], None] | None = None) -> dict:
    """Run the Tiny Updater on ``base_model`` (M0, left untouched).

    Trains a fully-updated teacher (unless given) for ``teacher_epochs``, then a
    student from M0 with task loss + KD (if ``kd``) under ``config``'s sparse
    target.  Returns ``{"student", "teacher", "base_state", "sparse", "check",
    "seconds"}``."""
    t0 = time.time()
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    if teacher is None and kd:
        teacher = _train_teacher(base_model, train_ds, config, teacher_epochs, teacher_lr)
        if log:
            log(f"teacher trained ({time.time() - t0:.1f}s)")
    set_seed(config.seed + 2)
    student = copy.deepcopy(base_model)
    tr = Trainer(config, student, train_ds, base_state=base_state, teacher=teacher if kd else None)
    if log:
        tr.add_callback("on_epoch_end", lambda t: log(f"student epoch {t.history[-1]['epoch']}: "
                                                      f"loss {t.history[-1]['mean_loss']:.4f}, kept "
                                                      f"{t.sparse.num_kept if t.sparse else '-'}"))
    tr.run()
    check = None
    if tr.sparse is not None:
        tr.sparse.remove_hooks()
        check = tr.sparse.verify(base_state)
    return {"student": student, "teacher": teacher, "base_state": base_state, "sparse": tr.sparse,
            "check": check, "seconds": time.time() - t0}


def _train_teacher(base_model: nn.Module, train_ds, config: TrainerConfig, epochs: int | None,
                   lr: float | None) -> nn.Module:
    """M0 fine-tuned with every parameter free (the full update), under ``config`` otherwise."""
    set_seed(config.seed + 1)
    teacher = copy.deepcopy(base_model)
    full = dataclasses.replace(config, ratio=None, budget_bytes=None, epochs=epochs or config.epochs,
                               lr=lr or config.lr, checkpoint_path=None)
    Trainer(full, teacher, train_ds).run()
    return teacher
