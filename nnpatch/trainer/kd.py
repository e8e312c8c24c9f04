"""Knowledge-distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "task_loss"]

TASKS = ("classification", "regression")


def kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, task: str = "classification",
            temperature: float = 4.0) -> torch.Tensor:
    """Distillation loss of the student's outputs towards the teacher's.

    * ``classification``: ``T**2 * KL(softmax(t/T) || softmax(s/T))`` averaged over
      samples (logits' last axis is the class axis; leading axes are flattened
      into samples), as in Hinton et al. -- the ``T**2`` keeps gradient
      magnitudes comparable across temperatures.
    * ``regression`` (also image-to-image): mean squared error between outputs
      (``temperature`` is ignored).
    """
    teacher_out = teacher_out.detach()
    if task == "classification":
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        t = float(temperature)
        c = student_out.shape[-1]
        s = F.log_softmax(student_out.reshape(-1, c).float() / t, dim=-1)
        p = F.log_softmax(teacher_out.reshape(-1, c).float() / t, dim=-1)
        return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)
    if task == "regression":
        return F.mse_loss(student_out.float(), teacher_out.float())
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def task_loss(out: torch.Tensor, target: torch.Tensor, task: str = "classification") -> torch.Tensor:
    """Cross-entropy (classification) or MSE (regression)."""
    if task == "classification":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1).long())
    if task == "regression":
        return F.mse_loss(out.float(), target.float().reshape(out.shape))
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
