"""The options of ``nnpatch train-sparse``, declared once.

Each field of :class:`TrainSparseOptions` carries its default and its click
declaration (flags, type, help); :func:`click_options` makes the command's
options from them, ``train_sparse_run`` takes the same names as keywords, and
:meth:`TrainSparseOptions.trainer_fields` hands the fields that the Trainer
shares to :class:`~nnpatch.trainer.TrainerConfig`.

Options left ``None`` take the digits recipe's tuned values with ``--recipe``,
else the Trainer's own defaults (``nnpatch.trainer.run`` fills them in).

Imports only click: the command module must not import torch.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

import click

__all__ = ["TrainSparseOptions", "click_options"]


def _option(*flags: str, default: Any = MISSING, trainer: bool = False, **click_kwargs: Any) -> Any:
    """A field that is the click option ``flags`` (``trainer``: a TrainerConfig field of the same name)."""
    metadata = {"flags": flags, "click": click_kwargs, "trainer": trainer}
    return field(default=default, metadata=metadata)


_WEIGHTS_FILE = click.Path(dir_okay=False)
_SPEC_HELP = "module.path:fn (from the working directory) or path/to/file.py:fn; fn() returns "


@dataclass(kw_only=True)
class TrainSparseOptions:
    """Everything ``nnpatch train-sparse`` is told; field order is the order of ``--help``."""

    recipe: str | None = _option(
        "--recipe", default=None, type=click.Choice(["digits"]),
        help="Built-in offline scenario (digits: sklearn's 8x8 digits, v1 on clean images, "
             "update on rotated+noisy ones). Also writes the base model.")
    model_spec: str | None = _option(
        "--model", default=None, metavar="SPEC",
        help=_SPEC_HELP + "a torch.nn.Module (the architecture; its weights come from --base).")
    data_spec: str | None = _option(
        "--data", default=None, metavar="SPEC",
        help=_SPEC_HELP + "(train_loader, eval_loader): each a DataLoader or any re-iterable of "
                          "(inputs, targets) batches, or a map-style Dataset of (input, target) samples.")
    base: str | None = _option(
        "--base", default=None, type=_WEIGHTS_FILE, help="Pre-update weights M0 (.safetensors).")
    base_out: str | None = _option(
        "--base-out", default=None, type=_WEIGHTS_FILE,
        help="With --recipe: where to write the base model (default <stem>.base.safetensors beside -o).")
    ratio: float | None = _option(
        "--ratio", default=None, trainer=True, type=float,
        help="Share of channels allowed to change (default 0.1; see Channels below).")
    budget: str | None = _option(
        "--budget", default=None, metavar="BYTES",
        help="Byte budget for the whole patch instead of --ratio (e.g. 2MB, 512KiB): the header and "
             "digests are counted (measured with the real writer before training; a budget below the "
             "smallest patch exits 2), a patch written over it drops its least important channels.")
    teacher_path: str | None = _option(
        "--teacher", default=None, type=_WEIGHTS_FILE, help="A fully-updated teacher (.safetensors) to distil from.")
    teacher_epochs: int | None = _option(
        "--teacher-epochs", default=None, type=int, help="Epochs to train the teacher (if not given).")
    epochs: int | None = _option("--epochs", default=None, trainer=True, type=int, help="Student epochs.")
    lr: float | None = _option(
        "--lr", default=None, trainer=True, type=float,
        help="Learning rate (AdamW, cosine schedule). Default: 1e-2 for the student and 3e-3 for the "
             "teacher; given, both use it.")
    batch_size: int | None = _option(
        "--batch-size", default=None, trainer=True, type=int,
        help="Batch size for datasets (default 64); loaders keep their own.")
    task: str | None = _option(
        "--task", default=None, trainer=True, type=click.Choice(["classification", "regression"]),
        help="Loss and metric (default classification).")
    kd_temperature: float | None = _option(
        "--kd-temperature", default=None, trainer=True, type=float,
        help="Softmax temperature T of the KD term (default 2).")
    kd_weight: float | None = _option(
        "--kd-weight", default=None, trainer=True, type=float,
        help="loss = task + W * KD (default 3).")
    method: str = _option(
        "--method", default="nnpatch", type=click.Choice(["nnpatch", "tiny-updater"]), show_default=True,
        help="nnpatch: the measured best rule (Fisher-weighted channel ranking, learning-rate restart "
             "after the prune ramp, the defaults of --norm-stats and --delta-bits below); tiny-updater: "
             "the published rule of Tiny Updater (Zhang and Ma, ICCV 2023): channels ranked by L1 "
             "movement, one cosine schedule, frozen norm layers, full-precision values.")
    norm_stats: str = _option(
        "--norm-stats", default="frozen", trainer=True, type=click.Choice(["frozen", "adapt", "affine"]),
        show_default=True,
        help="Normalization layers of frozen channels: kept as in the base (the channel rule; the default, "
             "measured: 'affine' won on mnist5k/shift, lost on digits/shift and under every --budget "
             "tried); 'adapt': "
             "BatchNorm running statistics follow the new data in every channel (2 numbers per channel; "
             "helps after an input shift such as noise); 'affine': also train every channel's scale and "
             "shift (2 more). Neither makes a channel count as changed; the report counts them apart.")
    delta_bits: int | str | None = _option(
        "--delta-bits", default=None, type=click.Choice(["8", "4", "off"]),
        help="Quantize the kept channels' deltas to 8- or 4-bit codes with a scale per channel "
             "(a short quantization-aware phase after the sparse update); the patch uses the qrows op "
             "(format 1.3), and -o is exactly what it rebuilds. 'off': full-precision values. Default: "
             "4 with --ratio (off with --method tiny-updater); with --budget, 4 unless the whole "
             "update fits at full precision.")
    seed: int = _option("--seed", default=0, trainer=True, type=int, show_default=True,
                             help="Seed of every random choice (initialisation, shuffling, channel ties): "
                                  "the same seed and data give the same model and patch.")
    device: str = _option("--device", default="cpu", trainer=True, type=click.Choice(["cpu", "cuda"]),
                          show_default=True, help="Where to train (cuda needs a CUDA build of torch).")
    checkpoint: str | None = _option(
        "--checkpoint", default=None, type=_WEIGHTS_FILE, metavar="FILE",
        help="Save the run's state to FILE after every epoch (replaced atomically), to go on with --resume.")
    resume: bool = _option(
        "--resume", default=False, is_flag=True,
        help="Go on from --checkpoint FILE (same options as the run that wrote it); the result is "
             "the one the uninterrupted run gives.")
    output: str = _option("-o", "--output", required=True, type=_WEIGHTS_FILE,
                          help="Where to write the updated weights (.safetensors, with the base's metadata); "
                               "missing folders are created.")
    patch: str = _option("--patch", required=True, type=_WEIGHTS_FILE,
                         help="Where to write the patch from the base to the updated weights.")
    #: estimated patch bytes per raw byte of a changed channel, when fitting ``--budget`` (no CLI option)
    cost_factor: float = field(default=0.9, metadata={"trainer": True})

    def trainer_fields(self) -> dict[str, Any]:
        """The fields that TrainerConfig has too, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("trainer")}


def click_options(options: type = TrainSparseOptions) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of ``options`` that declares one, in field order."""
    declared = [f for f in fields(options) if "flags" in f.metadata]

    def decorate(command: Callable) -> Callable:
        for f in reversed(declared):  # click lists the last-applied option first
            default = {} if f.default is MISSING else {"default": f.default}
            command = click.option(*f.metadata["flags"], f.name, **default, **f.metadata["click"])(command)
        return command

    return decorate
