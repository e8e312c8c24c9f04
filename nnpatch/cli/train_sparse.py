"""``nnpatch train-sparse``: the Tiny Updater trainer as a click command.

Imports no torch at import time (click, nnpatch.errors and the declared
options only); torch and the trainer are imported when the command runs.  ``nnpatch.cli``
loads it when ``train-sparse`` runs, and leaves the command out where the trainer does not
import.  Under torchrun: ``torchrun ... -m nnpatch train-sparse ARGS``.

The trainer's modules are imported by absolute name, so that an install without
``nnpatch.trainer`` (or a test that hides it) fails this module's import, not the command.
"""

from __future__ import annotations

import os
import sys

import click

from nnpatch.errors import BudgetMissedError, MissingDependencyError, UsageError
from nnpatch.trainer.options import TrainSparseOptions, click_options

from ._common import emit_json, quiet

__all__ = ["train_sparse"]


_EPILOG = """\b
Bring your own model (docs/TRAIN-SPARSE.md has a complete example):
  --model mymodel:build   build() returns a torch.nn.Module: the architecture,
                          whose weights are replaced by --base.
  --data mydata:loaders   loaders() returns (train_loader, eval_loader); each is
                          a DataLoader or any re-iterable of (inputs, targets)
                          batches, or a map-style Dataset of (input, target)
                          samples (batched with --batch-size). Targets: class
                          indices (classification) or tensors shaped like the
                          output (regression).
  A module name is looked up from the working directory first; a path such as
  src/mymodel.py:build works from anywhere. A name that is not callable (or is
  an nn.Module) is used as it is.

\b
Channels (the units --ratio and --budget count):
  one output channel of Conv1d/2d/3d and ConvTranspose (groups=1), one output
  row of Linear and Bilinear, one row of Embedding, one gate unit of RNN, LSTM
  and GRU, one row of MultiheadAttention's input projection -- each with its
  bias and with the BatchNorm, LayerNorm, GroupNorm, InstanceNorm or RMSNorm
  right after it. A norm on its own: one channel per feature. Any other float
  tensor (a position embedding, a scale) is one channel of its own.
  Integer buffers (num_batches_tracked) never change.

\b
Progress (stderr): one line per epoch of the teacher (the full update) and of
the student (the sparse update) with the loss, the metric on the eval data,
the free channels (those still allowed to change: they ramp down to the
target, then only those train) and the time left. --checkpoint FILE saves the
run after every epoch; the same command with --resume goes on from there.

\b
Exit codes:
  0  ok
  1  the result does not qualify: over --ratio's channels (nothing written), or
     the patch is still larger than --budget after dropping channels to fit
     (both files written, the table printed)
  2  usage error (bad options; a SPEC that names no module, file or function;
     a --budget below the smallest patch of the model, said before training)
  3  invalid input file (--base, --teacher or the checkpoint)
  5  I/O error (a folder cannot be created, disk full)
  6  the code behind --model or --data raised, or returned something other
     than the above (one line; nnpatch --debug train-sparse ... shows the traceback)
  130 interrupted (with --checkpoint, rerun with --resume)"""


@click.command("train-sparse", epilog=_EPILOG)
@click_options(TrainSparseOptions)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def train_sparse(as_json: bool, **options) -> None:
    """Update a model so that only a few channels change (Tiny Updater), and write the patch.

    A teacher is fine-tuned with every parameter free; a student, starting from
    the same base, distils from it while all but --ratio of its channels (or
    what fits --budget) are reset to the base, step by step.  The student is
    written to -o and the patch from --base to it to --patch."""
    opts = TrainSparseOptions(**options)
    if opts.base_out is not None and opts.recipe is None:
        raise UsageError("--base-out only goes with --recipe")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependencyError("train-sparse needs PyTorch: pip install 'nnpatch[train]'") from None
    from nnpatch.trainer.run import train_sparse_run  # here, not on top: it imports torch

    silent = as_json or quiet(click.get_current_context())

    def log(msg: str) -> None:
        if not silent:
            click.echo(msg, err=True)

    try:
        report = train_sparse_run(opts, log=log)
    except BudgetMissedError as e:  # the files are written: show what they hold, then fail
        if e.report is not None and not as_json:  # with --json, stdout holds the error object alone
            _table(e.report)
        raise
    if report is None:  # a rank > 0 of a distributed run: its part is done, and rank 0 writes the files
        # Leave without the interpreter's teardown: torch's C++ side (gloo's threads, after
        # destroy_process_group) intermittently aborts there ("terminate called without an active
        # exception", SIGABRT), and torchrun then kills rank 0 while it writes the output.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if as_json:
        emit_json(report)
    else:
        _table(report)


def _table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = r["metric"]
    unit = "%" if metric == "accuracy" else " dB"
    t = Table(title="train-sparse (Tiny Updater)")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row(f"base {metric}", f"{r['base_metric']:.2f}{unit}")
    t.add_row(f"teacher (full update) {metric}", f"{r['teacher_metric']:.2f}{unit}")
    t.add_row(f"student (sparse) {metric}", f"{r['student_metric']:.2f}{unit}")
    t.add_row("channels changed", f"{r['channels_changed']} / {r['channels_total']} "
                                  f"({r['percent_channels_changed']:.1f}%)")
    t.add_row("parameters changed", f"{r['params_changed']} / {r['params_total']} "
                                    f"({r['percent_params_changed']:.1f}%)")
    if r.get("norm_stats") in ("adapt", "affine"):
        what = "statistics" if r["norm_stats"] == "adapt" else "statistics, scales, shifts"
        t.add_row("norm values changed", f"{r['norm_stats_changed']} ({what})")
    if r.get("delta_bits"):
        how = " (chosen for the budget)" if "delta_bits" in r.get("chosen_by_budget", []) else ""
        t.add_row("deltas", f"{r['delta_bits']}-bit codes{how}")
    if r.get("channels_dropped_to_fit"):
        t.add_row("channels dropped to fit", f"{r['channels_dropped_to_fit']}")
    t.add_row("model bytes", f"{r['model_bytes']:,}")
    t.add_row("patch bytes", f"{r['patch_bytes']:,}")
    if r.get("budget_bytes") is not None:
        t.add_row("budget bytes", f"{r['budget_bytes']:,} ({'met' if r.get('budget_met') else 'MISSED'})")
    t.add_row("base / new / patch", f"{r['base']} / {r['output']} / {r['patch']}")
    Console(stderr=True).print(t)

