"""A small minGPT-style trainer with channel-sparse updates and distillation.

::

    cfg = TrainerConfig(epochs=10, lr=3e-3, ratio=0.1)
    trainer = Trainer(cfg, student, train_ds, base_state=m0_state, teacher=teacher)
    trainer.add_callback("on_epoch_end", lambda tr: print(tr.epoch, tr.loss))
    trainer.run()                       # or trainer.run(resume_from="ckpt.pt")

With ``ratio=None`` and ``budget_bytes=None`` every parameter is free (the
"full update", used to train a teacher).  The training data is a map-style
dataset of samples (batched with ``batch_size``) or any re-iterable of
``(inputs, targets)`` batches such as a DataLoader (:mod:`nnpatch.trainer.data`).
Data order is a function of ``(seed, epoch)`` only, so a run resumed from a
checkpoint (``checkpoint_path``, written every ``checkpoint_every`` steps and at
the end) reproduces the uninterrupted run exactly.  Under ``torch.distributed``
(initialised by the caller, e.g. via :func:`init_distributed`), the model is
wrapped in DDP and each rank reads every ``world_size``-th sample of the
epoch's permutation (every ``world_size``-th batch of a loader).

Callback events: ``on_batch_end``, ``on_prune``, ``on_epoch_end``, ``on_train_end``.

A checkpoint is a dict loadable with ``torch.load(path, weights_only=True)``:
``config`` (the TrainerConfig as a dict), ``step``, ``epoch``, ``model`` (state
dict), ``masks`` (group name -> bool tensor, True = kept; None for a full update),
``prune_events_done``, ``optimizer`` (its state dict) and ``rng`` (torch CPU RNG
state).
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from ..atomic import atomic_path
from .data import Batches, as_batches, to_device
from .kd import kd_loss, task_loss
from .patch_cost import PatchCost
from .sparse import PruneSchedule, SparseUpdate

__all__ = ["TrainerConfig", "Trainer", "set_seed", "evaluate", "init_distributed", "world_info"]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def world_info() -> tuple[int, int]:
    """(rank, world_size), (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "cpu") -> bool:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, ...).

    Returns True when running with more than one process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_world_size() > 1


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"          # adamw | sgd
    momentum: float = 0.9             # sgd only
    lr_schedule: str = "cosine"       # cosine | constant
    warmup_steps: int = 0
    grad_clip: float | None = 5.0
    task: str = "classification"      # classification | regression
    kd_temperature: float = 4.0
    kd_weight: float = 1.0            # loss = task + kd_weight * kd (when a teacher is given)
    task_weight: float = 1.0
    ratio: float | None = None        # share of channels to keep; None with budget_bytes None: full update
    budget_bytes: int | None = None
    cost_factor: float = 1.0
    schedule: str = "cubic"           # cubic | linear | oneshot | start
    prune_end: float = 0.25
    prune_events: int = 10
    selection: str = "fisher"         # fisher | fisher_layer | l1 | l1_mean | l1_layer | random | teacher | teacher_layer
    norm_stats: str = "frozen"        # frozen | adapt | affine: norm layers of frozen channels (sparse.py)
    seed: int = 0
    device: str = "cpu"
    checkpoint_path: str | None = None
    checkpoint_every: int = 0          # steps; 0: only at the end (if checkpoint_path)
    max_steps: int | None = None       # stop early (for tests of resuming)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Trainer:
    def __init__(self, config: TrainerConfig, model: nn.Module, train_dataset: Any, *,
                 base_state: dict[str, torch.Tensor] | None = None, teacher: nn.Module | None = None,
                 loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
                 cost: PatchCost | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        #: a map-style dataset of samples, or any re-iterable of (inputs, targets) batches (nnpatch.trainer.data)
        self.train_dataset = train_dataset
        self.data: Batches = as_batches(train_dataset, batch_size=config.batch_size, seed=config.seed)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.loss_fn = loss_fn
        self.callbacks: dict[str, list[Callable[["Trainer"], None]]] = defaultdict(list)
        self.rank, self.world = world_info()
        self.sparse: SparseUpdate | None = None
        if config.ratio is not None or config.budget_bytes is not None:
            self.sparse = SparseUpdate(
                self.model, base_state, ratio=config.ratio, budget_bytes=config.budget_bytes,
                cost_factor=config.cost_factor, selection=config.selection, seed=config.seed,
                norm_stats=config.norm_stats, cost=cost,
                schedule=PruneSchedule(config.schedule, config.prune_end, config.prune_events),
                reference_state=({k: v.detach() for k, v in self.teacher.state_dict().items()}
                                 if self.teacher is not None and config.selection.startswith("teacher") else None))
        self.step = 0
        self.epoch = 0
        self.loss = float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        self.history: list[dict] = []
        self.optimizer = self._make_optimizer()

    # ---------------------------------------------------------------- set-up
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        raise ValueError(f"unknown optimizer {c.optimizer!r}")

    def add_callback(self, event: str, fn: Callable[["Trainer"], None]) -> None:
        self.callbacks[event].append(fn)

    def trigger(self, event: str) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self)

    def steps_per_epoch(self) -> int:
        return self.data.num_batches(self.world)

    def total_steps(self) -> int:
        return self.steps_per_epoch() * self.config.epochs

    def _lr_at(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        total = max(1, self.total_steps())
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    # -------------------------------------------------------------- checkpoint
    def checkpoint(self) -> dict:
        raw = self.model
        return {
            "config": asdict(self.config),
            "step": self.step,
            "epoch": self.epoch,
            "model": {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()},
            "masks": self.sparse.state_dict()["masks"] if self.sparse is not None else None,
            "prune_events_done": self.sparse.events_done if self.sparse is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        path = path or self.config.checkpoint_path
        if path is None or self.rank != 0:
            return
        with atomic_path(path, mode=0o666) as tmp:  # the umask decides, as for torch.save alone
            torch.save(self.checkpoint(), tmp)

    def load_checkpoint(self, path_or_state: str | os.PathLike | dict) -> None:
        state = path_or_state if isinstance(path_or_state, dict) else \
            torch.load(path_or_state, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.sparse is not None and state.get("masks") is not None:
            self.sparse.load_state_dict({"masks": state["masks"],
                                         "events_done": state.get("prune_events_done", 0)})
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])

    # --------------------------------------------------------------- training
    def _loss(self, out: torch.Tensor, y: Any, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        loss = self.loss_fn(out, y) if self.loss_fn is not None else task_loss(out, y, c.task)
        loss = c.task_weight * loss
        if self.teacher is not None and c.kd_weight:
            with torch.no_grad():
                t_out = self.teacher(x)
            loss = loss + c.kd_weight * kd_loss(out, t_out, c.task, c.kd_temperature)
        return loss

    def run(self, resume_from: str | os.PathLike | dict | None = None) -> "Trainer":
        c = self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        model: nn.Module = self.model
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(self.model)
        total = self.total_steps()
        spe = self.steps_per_epoch()
        if self.sparse is not None:
            self.sparse.optimizer = self.optimizer
            if self.step == 0:
                self.sparse.on_step(0, total, self.optimizer)
        stop = total if c.max_steps is None else min(total, c.max_steps)
        self.model.train()
        while self.step < stop:
            self.epoch = self.step // spe
            done_in_epoch = self.step - self.epoch * spe
            for x, y in self.data.epoch(self.epoch, start=done_in_epoch, rank=self.rank, world=self.world):
                x = to_device(x, self.device)
                y = to_device(y, self.device)
                for g in self.optimizer.param_groups:
                    g["lr"] = self._lr_at(self.step)
                out = model(x)
                loss = self._loss(out, y, x)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.sparse is not None:
                    self.sparse.after_backward()
                if c.grad_clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                if self.sparse is not None:
                    self.sparse.after_step(self.optimizer)
                self.step += 1
                self.loss = float(loss.detach())
                self._loss_sum += self.loss
                self._loss_n += 1
                self.trigger("on_batch_end")
                if self.sparse is not None and self.sparse.on_step(self.step, total, self.optimizer):
                    self._sync_masks()
                    self.trigger("on_prune")
                if c.checkpoint_path and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step >= stop or self.step % spe == 0:
                    break
            if self.step % spe == 0 or self.step >= total:
                self.history.append({"epoch": self.step // spe, "step": self.step, "loss": self.loss,
                                     "mean_loss": self._loss_sum / max(1, self._loss_n)})
                self._loss_sum, self._loss_n = 0.0, 0
                self.trigger("on_epoch_end")
        if self.world > 1:
            self._sync_buffers()
        if self.step >= total:
            if self.sparse is not None:
                self.sparse.finalize()
            self.trigger("on_train_end")
        if c.checkpoint_path:
            self.save_checkpoint()
        self.model.eval()
        return self

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Take rank 0's buffers (BN running stats), as DDP does before every forward."""
        import torch.distributed as dist

        for b in self.model.buffers():
            dist.broadcast(b, src=0)

    def _sync_masks(self) -> None:
        """Make every rank use rank 0's masks (they agree already; this is a guard)."""
        if self.world <= 1 or self.sparse is None:
            return
        import torch.distributed as dist

        vec = self.sparse.mask_vector().to(torch.uint8)
        dist.broadcast(vec, src=0)
        self.sparse.set_mask_vector(vec.bool())
        self.sparse.reset_frozen()
        self.sparse.mask_optimizer_state(self.optimizer)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, task: str = "classification", batch_size: int = 256,
             device: str = "cpu") -> dict:
    """Accuracy (%) for classification; MSE and PSNR (dB, data range 1) for regression.

    ``dataset``: a map-style dataset (batched by ``batch_size``, in order), or any re-iterable of
    ``(inputs, targets)`` batches such as a DataLoader (nnpatch.trainer.data)."""
    was_training = model.training
    model.eval()
    n = 0
    correct = 0
    se = 0.0
    count = 0
    for x, y in as_batches(dataset, batch_size=batch_size, what="eval").epoch(0, shuffle=False):
        out = model(to_device(x, device))
        y = to_device(y, device)
        if task == "classification":
            correct += int((out.argmax(-1) == y).sum())
            n += y.numel()
        else:
            se += float(((out.float() - y.float().reshape(out.shape)) ** 2).sum())
            count += out.numel()
    model.train(was_training)
    if task == "classification":
        return {"accuracy": 100.0 * correct / max(1, n)}
    mse = se / max(1, count)
    return {"mse": mse, "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")}
