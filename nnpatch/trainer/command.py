"""``nnpatch train-sparse``: the Tiny Updater trainer as a click command.

Imports only click, the standard library and nnpatch.errors at import time;
torch and the trainer are imported when the command runs.  ``nnpatch.cli``
registers it (its name is ``train-sparse``).  ``python -m
nnpatch.trainer.command ARGS``, also under torchrun, is ``nnpatch train-sparse
ARGS``: the main CLI's error handling included.
"""

from __future__ import annotations

import json
import sys

import click

from nnpatch.errors import MissingDependencyError, UsageError

__all__ = ["train_sparse"]


@click.command("train-sparse")
@click.option("--recipe", type=click.Choice(["digits"]), default=None,
              help="Built-in offline scenario (digits: sklearn's 8x8 digits, v1 on clean images, "
                   "update on rotated+noisy ones). Also writes the base model.")
@click.option("--model", "model_spec", metavar="SPEC", default=None,
              help="module.path:callable or file.py:callable giving the nn.Module (architecture).")
@click.option("--data", "data_spec", metavar="SPEC", default=None,
              help="module.path:callable or file.py:callable giving (train_dataset, eval_dataset).")
@click.option("--base", type=click.Path(dir_okay=False), default=None,
              help="Pre-update weights M0 (.safetensors).")
@click.option("--base-out", type=click.Path(dir_okay=False), default=None,
              help="With --recipe: where to write the base model (default <stem>.base.safetensors beside -o).")
@click.option("--ratio", type=float, default=None, help="Share of channels allowed to change (default 0.1).")
@click.option("--budget", metavar="BYTES", default=None,
              help="Byte budget for the update instead of --ratio (e.g. 2MB, 512KiB).")
@click.option("--teacher", "teacher_path", type=click.Path(dir_okay=False), default=None,
              help="A fully-updated teacher (.safetensors) to distil from.")
@click.option("--teacher-epochs", type=int, default=None, help="Epochs to train the teacher (if not given).")
@click.option("--epochs", type=int, default=None, help="Student epochs.")
@click.option("--lr", type=float, default=None,
              help="Learning rate (AdamW, cosine schedule; default 3e-3; recipe digits: 1e-2).")
@click.option("--batch-size", type=int, default=None, help="Batch size (default 64).")
@click.option("--task", type=click.Choice(["classification", "regression"]), default=None,
              help="Loss and metric (default classification).")
@click.option("--kd-temperature", type=float, default=None,
              help="Softmax temperature T of the KD term (default 4; recipe digits: 2).")
@click.option("--kd-weight", type=float, default=None,
              help="loss = task + W * KD (default 1; recipe digits: 3).")
@click.option("--norm-stats", type=click.Choice(["frozen", "adapt"]), default="frozen", show_default=True,
              help="BatchNorm running statistics of frozen channels: kept as in the base (the channel rule), "
                   "or adapted to the new data in every channel (2 numbers per channel; helps after an input "
                   "shift such as noise).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the updated weights (.safetensors).")
@click.option("--patch", required=True, type=click.Path(dir_okay=False),
              help="Where to write the patch from the base to the updated weights.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def train_sparse(recipe, model_spec, data_spec, base, base_out, ratio, budget, teacher_path, teacher_epochs,
                 epochs, lr, batch_size, task, kd_temperature, kd_weight, norm_stats, seed, device, output, patch,
                 as_json):
    """Update a model so that only a few channels change (Tiny Updater), and write the patch."""
    if base_out is not None and recipe is None:
        raise UsageError("--base-out only goes with --recipe")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependencyError("train-sparse needs PyTorch: pip install 'nnpatch[train]'") from None
    from nnpatch.trainer.run import train_sparse_run  # here, not on top: it imports torch

    def log(msg: str) -> None:
        if not as_json:
            click.echo(msg, err=True)

    report = train_sparse_run(
        recipe=recipe, model_spec=model_spec, data_spec=data_spec, base=base, ratio=ratio, budget=budget,
        teacher_path=teacher_path, teacher_epochs=teacher_epochs, epochs=epochs, lr=lr,
        batch_size=batch_size, task=task, kd_temperature=kd_temperature, kd_weight=kd_weight,
        norm_stats=norm_stats, seed=seed,
        device=device, output=output, patch=patch, base_out=base_out, log=log)
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
