"""``nnpatch diff``."""

from __future__ import annotations

import os

import click

from .. import codecs
from ..differ import diff as make_diff
from ._common import EXIT_CODES_HELP, emit_json, human
from ._progress import progress


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("old", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Patch file to write.")
@click.option("--level", type=click.IntRange(codecs.MIN_LEVEL, codecs.MAX_LEVEL), default=codecs.DEFAULT_LEVEL,
              show_default=True, help="zstd level: higher is smaller and slower.")
@click.option("--reversible", is_flag=True,
              help="Also carry what `nnpatch revert` needs to take NEW back to OLD.")
@click.option("--sign-key", type=click.Path(dir_okay=False), help="Sign with this Ed25519 private key (PEM).")
@click.option("--stat/--no-stat", default=True, help="Print a per-tensor summary (default on).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def diff(ctx, old, new, output, level, reversible, sign_key, stat, as_json):
    """Write a patch that turns OLD into NEW exactly."""
    total = os.path.getsize(new) if os.path.exists(new) else 0
    with progress(ctx, "diff", total, not as_json) as advance:
        result = make_diff(old, new, output, level=level, reversible=reversible, sign_key=sign_key,
                           progress=advance)
    if as_json:
        emit_json(_diff_json(result))
    elif stat:
        _print_stat(result)


def _diff_json(r) -> dict:
    return {
        "patch": r.path, "patch_size": r.patch_size, "base_size": r.base_size, "target_size": r.target_size,
        "ratio": r.ratio, "trailer_blake3": r.trailer_hash, "tensors": r.tensors_total,
        "changed": [
            {"name": c.name, "op": c.op, "dtype": c.dtype, "shape": list(c.shape), "rows_changed": c.rows_changed,
             "rows_total": c.rows_total, "elements_changed": c.elements_changed,
             "elements_total": c.elements_total, "patch_bytes": c.patch_bytes, "codec": c.codec}
            for c in r.changes
        ],
    }


def _print_stat(r) -> None:
    width = 30
    name_w = min(48, max([len(c.name) for c in r.changes] + [4]))
    for c in r.changes:
        if c.op in ("rows",):
            frac, what = c.rows_changed / max(1, c.rows_total), f"{c.rows_changed}/{c.rows_total} rows"
        elif c.op == "elements":
            frac, what = c.elements_changed / max(1, c.elements_total), f"{c.elements_changed}/{c.elements_total} el"
        else:
            frac, what = 1.0, c.op
        bar = "+" * max(1, round(frac * width)) if c.op != "remove" else "-" * width
        name = c.name if len(c.name) <= name_w else "..." + c.name[-(name_w - 3):]
        click.echo(f" {name:<{name_w}} | {what:>18} {human(c.patch_bytes):>10} {bar}")
    added = sum(c.op == "add" for c in r.changes)
    removed = sum(c.op == "remove" for c in r.changes)
    click.echo(f" {len(r.changes)} of {r.tensors_total} tensors changed ({added} added, {removed} removed); "
               f"patch {human(r.patch_size)} = {100 * r.ratio:.2f}% of the target ({human(r.target_size)})")
