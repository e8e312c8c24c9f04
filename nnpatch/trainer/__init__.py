"""Tiny Updater trainer: channel-sparse model updates with knowledge distillation.

Importing ``nnpatch.trainer`` does not import torch; the names below load their
module (and torch) on first use.  The ``train-sparse`` click command lives in
the front, ``nnpatch.cli.train_sparse``, and imports only click at import time.

Main API::

    from nnpatch.trainer import group_channels, SparseUpdate, kd_loss, Trainer, TrainerConfig, set_seed
    from nnpatch.trainer import update              # the Tiny Updater (nnpatch.trainer.tiny_updater)
    from nnpatch.trainer import train_sparse_run, TrainSparseOptions   # what ``train-sparse`` runs
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChannelGroup": "channels", "Member": "channels", "group_channels": "channels",
    "unwrap_model": "channels",
    "SparseUpdate": "sparse", "PruneSchedule": "sparse", "changed_channels": "sparse",
    "kd_loss": "kd", "task_loss": "kd",
    "Trainer": "trainer", "TrainerConfig": "trainer", "set_seed": "trainer", "evaluate": "trainer",
    "init_distributed": "trainer",
    "update": "tiny_updater", "train_sparse_run": "run", "load_spec": "usercode", "save_weights": "run",
    "load_weights": "run", "parse_bytes": "run",
    "TrainSparseOptions": "options", "Batches": "data", "Progress": "progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'nnpatch.trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
