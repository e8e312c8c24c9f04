"""``nnpatch train-sparse``: the Tiny Updater trainer as a click command.

Imports no torch at import time (click, nnpatch.errors and the declared
options only); torch and the trainer are imported when the command runs.  ``nnpatch.cli``
registers it (its name is ``train-sparse``).  ``python -m
nnpatch.trainer.command ARGS``, also under torchrun, is ``nnpatch train-sparse
ARGS``: the main CLI's error handling included.
"""

from __future__ import annotations

import json
import sys

import click

from nnpatch.errors import MissingDependencyError, UsageError
from nnpatch.trainer.options import TrainSparseOptions, click_options

__all__ = ["train_sparse"]


@click.command("train-sparse")
@click_options(TrainSparseOptions)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def train_sparse(as_json: bool, **options) -> None:
    """Update a model so that only a few channels change (Tiny Updater), and write the patch."""
    opts = TrainSparseOptions(**options)
    if opts.base_out is not None and opts.recipe is None:
        raise UsageError("--base-out only goes with --recipe")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependencyError("train-sparse needs PyTorch: pip install 'nnpatch[train]'") from None
    from nnpatch.trainer.run import train_sparse_run  # here, not on top: it imports torch

    def log(msg: str) -> None:
        if not as_json:
            click.echo(msg, err=True)

    report = train_sparse_run(opts, log=log)
    if report is None:  # a rank > 0 of a distributed run
        return
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
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
    if r.get("norm_stats") == "adapt":
        t.add_row("norm statistics changed", f"{r['norm_stats_changed']}")
    t.add_row("model bytes", f"{r['model_bytes']:,}")
    t.add_row("patch bytes", f"{r['patch_bytes']:,}")
    if r.get("budget_bytes") is not None:
        t.add_row("budget bytes", f"{r['budget_bytes']:,} ({'met' if r.get('budget_met') else 'MISSED'})")
    t.add_row("base / new / patch", f"{r['base']} / {r['output']} / {r['patch']}")
    Console(stderr=True).print(t)


if __name__ == "__main__":
    # Through the main CLI, so that errors get its one handler.  Imported only here: nnpatch.cli
    # imports this module to register the command.
    from nnpatch.cli import cli

    cli(["train-sparse", *sys.argv[1:]], prog_name="nnpatch")
