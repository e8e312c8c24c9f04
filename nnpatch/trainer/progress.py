"""One line per epoch for ``train-sparse``: the loss, the eval metric, the free channels and the time left.

::

    teacher: the full update (every parameter free), 4 epochs of 5 batches; the student learns from it
    teacher epoch 1/4: loss 1.2034, eval accuracy 61.00% | 0:02 elapsed, about 0:09 left
    student: the sparse update, 4 epochs of 5 batches; free channels = channels still allowed to change,
      from 232 down to 23 (--ratio 0.1 of 232) by epoch 1; from then on only those train
    student epoch 1/4: loss 0.9012, eval accuracy 65.00%, free channels 23/232 | 0:05 elapsed, about 0:06 left

The time left is the epochs still to run, in both phases, times the mean
epoch time measured so far in that phase (a student epoch, which also runs
the teacher for distillation, is taken as 1.4 teacher epochs until one is
measured).  The evaluation runs under a forked RNG, so logging never changes
what is trained.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from .trainer import Trainer, evaluate

__all__ = ["Progress", "clock_text"]

#: a student epoch over a teacher epoch, until one of each is measured (one more forward pass for KD)
STUDENT_OVER_TEACHER = 1.4


def clock_text(seconds: float) -> str:
    """``0:07``, ``12:03``, ``1:02:03``."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun == 'batch' else 's'}"


class Progress:
    """Logs the phases (``{"teacher": epochs, "student": epochs}``, in order) of one update."""

    def __init__(self, log: Callable[[str], None], phases: dict[str, int], *, eval_data: Any = None,
                 task: str = "classification", device: str = "cpu",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.total = dict(phases)
        self.done = {p: 0 for p in phases}
        self.measured: dict[str, list[float]] = {p: [] for p in phases}
        self.eval_data = eval_data
        self.task = task
        self.device = device
        self.clock = clock
        self.start = clock()
        self._phase: str | None = None
        self._since = self.start

    # ------------------------------------------------------------------ phases
    def skip(self, phase: str, why: str) -> None:
        """``phase`` does not run here (a teacher given, or finished before a resume)."""
        self.done[phase] = self.total[phase]
        self.log(f"{phase}: {why}")

    def begin(self, phase: str, tr: Trainer, *, resumed_from: str | None = None) -> None:
        self._phase = phase
        self._since = self.clock()
        spe = tr.steps_per_epoch()
        self.done[phase] = min(self.total[phase], tr.step // spe)
        shape = f"{_count(self.total[phase], 'epoch')} of {_count(spe, 'batch')}"
        if phase == "teacher":
            self.log(f"teacher: the full update (every parameter free), {shape}; the student learns from it")
        else:
            self.log(f"student: the sparse update, {shape}; {self._free_explained(tr)}")
        if resumed_from is not None:
            self.log(f"{phase}: resumed from {resumed_from} after epoch {self.done[phase]}/{self.total[phase]}")
        tr.add_callback("on_epoch_end", self._epoch_end)

    def _free_explained(self, tr: Trainer) -> str:
        su = tr.sparse
        if su is None:
            return "every channel may change"
        spe = tr.steps_per_epoch()
        last = su.plan(tr.total_steps())[-1][0]
        by = "before the first step" if last == 0 else f"by epoch {math.ceil(last / spe)}"
        if su.budget_bytes is not None:
            target = f"what fits --budget {su.budget_bytes:,} bytes"
        else:
            goal = math.floor(float(su.ratio) * su.num_channels + 1e-9)
            target = f"{goal} (--ratio {su.ratio:g} of {su.num_channels})"
        return (f"free channels = channels still allowed to change, from {su.num_channels} down to {target} "
                f"{by}; from then on only those train")

    # ------------------------------------------------------------------ epochs
    def _epoch_end(self, tr: Trainer) -> None:
        phase = self._phase
        assert phase is not None
        parts = [f"loss {tr.history[-1]['mean_loss']:.4f}"]
        if self.eval_data is not None:
            parts.append(f"eval {self._metric(tr.model)}")
        if tr.sparse is not None:
            parts.append(f"free channels {tr.sparse.num_kept}/{tr.sparse.num_channels}")
        now = self.clock()  # the evaluation counts in its epoch's time
        self.measured[phase].append(now - self._since)
        self._since = now
        self.done[phase] = min(self.total[phase], tr.step // tr.steps_per_epoch())
        left = self.seconds_left()
        when = f"{clock_text(now - self.start)} elapsed" + (f", about {clock_text(left)} left" if left is not None
                                                            else "")
        self.log(f"{phase} epoch {self.done[phase]}/{self.total[phase]}: {', '.join(parts)} | {when}")

    def _metric(self, model: torch.nn.Module) -> str:
        with torch.random.fork_rng(devices=[]):
            res = evaluate(model, self.eval_data, self.task, device=self.device)
        if self.task == "classification":
            return f"accuracy {res['accuracy']:.2f}%"
        return f"psnr {res['psnr']:.2f} dB"

    def seconds_left(self) -> float | None:
        """Estimated seconds until every phase is done (None before any epoch was timed)."""
        per = {p: sum(v) / len(v) for p, v in self.measured.items() if v}
        if not per:
            return None
        if "teacher" in self.total and "student" in self.total:
            if "teacher" in per and "student" not in per:
                per["student"] = per["teacher"] * STUDENT_OVER_TEACHER
            elif "student" in per and "teacher" not in per:
                per["teacher"] = per["student"] / STUDENT_OVER_TEACHER
        fallback = next(iter(per.values()))
        return sum((self.total[p] - self.done[p]) * per.get(p, fallback) for p in self.total)
