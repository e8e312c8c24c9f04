"""``nnpatch diff``."""

from __future__ import annotations

import errno
import os

import click

from .. import codecs
from ..atomic import write_error
from ..errors import NnpatchIOError, UsageError, WeightsError
from ..hashing import name_key
from ..differ import diff as make_diff
from ..report import printable
from ..weights.sniff import sniff
from ._common import InputPath, emit_json, human, json_option, quiet
from ._inputs import check_order
from ._progress import progress

#: Tensors the default summary names (the largest in the patch).
SUMMARY_TENSORS = 3


@click.command()
@click.argument("old", type=InputPath())
@click.argument("new", type=InputPath())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Patch file to write.")
@click.option("--level", type=click.IntRange(codecs.MIN_LEVEL, codecs.MAX_LEVEL), default=codecs.DEFAULT_LEVEL,
              show_default=True, help="zstd level: higher is smaller and slower.")
@click.option("--reversible", is_flag=True,
              help="Also carry what `nnpatch revert` needs to take NEW back to OLD.")
@click.option("--sign-key", type=InputPath(dir_okay=False, what="key file"),
              help="Sign with this Ed25519 private key (PEM).")
@click.option("--quantized", "deltas", metavar="DELTAS", type=InputPath(dir_okay=False, what="deltas file"),
              help="Write the tensors DELTAS names as exact quantized deltas (op qrows). DELTAS: a safetensors "
                   "file with, per tensor NAME, NAME.rows U64, NAME.scales F32, NAME.codes I8 and NAME.bits U8, "
                   "as nnpatch.differ.save_quant_deltas writes it (e.g. after your own quantization-aware "
                   "training; train-sparse --delta-bits makes such deltas itself). The patch then needs a format "
                   "1.3 reader and cannot be --reversible; a delta that does not rebuild NEW exactly is refused.")
@click.option("--aligned", is_flag=True,
              help="Start every section on a 64-byte boundary, as format 1.4 and older readers (nnpatch 0.4 "
                   "and before, on the device too) need. Default: sections packed end to end (format 1.5), "
                   "which saves up to 63 bytes per section: a tenth of a small patch.")
@click.option("--stat/--no-stat", default=None,
              help="--stat: a table of every changed tensor (as git diff --stat); --no-stat: print nothing. "
                   "Default: a two-line summary.")
@json_option()
@click.pass_context
def diff(ctx, old, new, output, level, reversible, sign_key, deltas, aligned, stat, as_json):
    """Write a patch that turns OLD into NEW exactly."""
    check_order("nnpatch diff OLD NEW -o PATCH", models={"OLD": old, "NEW": new}, patches={})
    if deltas is not None:
        if reversible:
            raise UsageError("--quantized and --reversible exclude each other: a qrows op cannot be undone "
                             "(its rounding loses the old values); drop one of them")
        check_order("nnpatch diff OLD NEW -o PATCH --quantized DELTAS", models={"--quantized": deltas}, patches={})
        _check_deltas_file(deltas)
    total = os.path.getsize(new) if os.path.exists(new) else 0
    with progress(ctx, "diff", total, not as_json) as advance:
        try:
            result = make_diff(old, new, output, level=level, reversible=reversible, sign_key=sign_key,
                               progress=advance, quantized=deltas, aligned=aligned)
        except OSError as e:
            cause = e.__cause__ if isinstance(e, NnpatchIOError) else e
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                # a patch's size is known only once written: at most about NEW's size, usually far less
                raise write_error(output, cause, what="the patch (at most about NEW's size, usually far less)",
                                  needed=None) from e
            raise
    if as_json:
        emit_json(_diff_json(result))
    elif stat:
        _print_stat(result)
    elif stat is None and not quiet(ctx):
        _print_summary(result)


def _check_deltas_file(path: str) -> None:
    """A --quantized file that is not safetensors is named for what it is (exit 3), before any model is read;
    a safetensors file of something else (a model) is refused by ``load_quant_deltas``, which names its first
    tensor that is not a NAME.rows/scales/codes/bits part."""
    if not os.path.isfile(path):
        return  # missing: the reader names it (exit 5)
    try:
        kind = sniff(path)
    except WeightsError:
        kind = None
    if kind != "safetensors":
        what = {"pytorch": "a PyTorch checkpoint", "onnx": "an ONNX model"}.get(kind, "not a safetensors file")
        raise WeightsError(f"{path}: {what}; --quantized takes a deltas file (safetensors, as "
                           "nnpatch.differ.save_quant_deltas writes it)")


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
        if c.op in ("rows", "qrows"):
            frac, what = c.rows_changed / max(1, c.rows_total), f"{c.rows_changed}/{c.rows_total} rows"
        elif c.op == "elements":
            frac, what = c.elements_changed / max(1, c.elements_total), f"{c.elements_changed}/{c.elements_total} el"
        else:
            frac, what = 1.0, c.op
        bar = "+" * max(1, round(frac * width)) if c.op != "remove" else "-" * width
        name = printable(c.name, backslash=False)
        name = name if len(name) <= name_w else "..." + name[-(name_w - 3):]
        click.echo(f" {name:<{name_w}} | {what:>18} {human(c.patch_bytes):>10} {bar}")
    click.echo(" " + _totals(r))


def _totals(r) -> str:
    added = sum(c.op == "add" for c in r.changes)
    removed = sum(c.op == "remove" for c in r.changes)
    return (f"{len(r.changes)} of {r.tensors_total} tensors changed ({added} added, {removed} removed); "
            f"patch {human(r.patch_size)} = {100 * r.ratio:.2f}% of the target ({human(r.target_size)})")


def _print_summary(r) -> None:
    """Two lines whatever the model's size: the totals, and the tensors that take most of the patch."""
    click.echo(f"wrote {r.path}: {_totals(r)}")
    if not r.changes:
        return
    top = sorted(r.changes, key=lambda c: (-c.patch_bytes, name_key(c.name)))
    named = ", ".join(f"{printable(c.name, backslash=False)} ({c.op}, {human(c.patch_bytes)})"
                      for c in top[:SUMMARY_TENSORS])
    more = len(r.changes) - SUMMARY_TENSORS
    tail = f", and {more} more; --stat lists every tensor" if more > 0 else ""
    click.echo(f"largest: {named}{tail}")
