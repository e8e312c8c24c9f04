"""``nnpatch show``: a patch's header for people.

Everything a patch says is untrusted: each string from it goes through
:func:`nnpatch.report.printable` (no terminal escapes, nothing the output
encoding cannot carry) and is printed as plain text, never as rich markup or
emoji codes."""

from __future__ import annotations

import errno
import os
import sys
import tempfile

import click
import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import codecs, dtypes
from ..patchfile import Op, Patch, read_patch, read_patch_stream
from ..report import bar, bar_glyphs_encodable, plot, printable, tensor_shares
from ..signing import key_id
from ..weights.tflite_file import is_index_key
from ._common import InputPath, emit_json, human, json_option
from ._inputs import check_order


#: Rows of each table at most: a patch may hold 262,144 ops and 65,536 files, and a terminal table of
#: them all takes minutes and gigabytes; the rest is summed up in one line (``--json`` lists every one).
MAX_ROWS = 200


class _Console(Console):
    """rich's console, except that a closed standard output (`| head`) goes to the command's one
    handler (a quiet stop, exit 0) instead of rich's own exit 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


@click.command()
@click.argument("patch", type=InputPath(dir_okay=False, allow_dash=True, what="patch file"))
@json_option(help="Print the header as JSON to stdout (and a JSON error object on failure).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw per-tensor changed share and patch bytes to this image (PNG, SVG or PDF; needs "
                   "matplotlib: pip install 'nnpatch[plot]'); at most the 40 largest tensors by patch bytes.")
def show(patch, as_json, plot_path):
    """Print a patch's header and a per-tensor table.

    PATCH '-' reads the patch from standard input. The changed share of a
    `whole` op is counted from its values (those equal to the old ones are
    unchanged), so it takes one pass over the patch's data.
    """
    check_order("nnpatch show PATCH", models={}, patches={"PATCH": patch})
    opened = read_patch_stream(directory=tempfile.gettempdir()) if patch == "-" else read_patch(patch)
    with opened as p:
        h = p.header
        shares = tensor_shares(h, changed={op.name: changed_elements(p, op) for op in h.ops if op.kind == "whole"})
        signature = p.signature
        if plot_path:
            drawn = plot(h, plot_path, title=os.path.basename(patch) if patch != "-" else "", shares=shares)
        if as_json:
            obj = h.to_json()
            obj["version"] = f"{h.version[0]}.{h.version[1]}"
            obj["size"] = p.size
            obj["trailer_blake3"] = p.trailer_hash
            obj["signed_by"] = key_id(signature[0]) if signature else None
            obj["changed_share"] = {s.name: s.share for s in shares}
            emit_json(obj)
            return
        console = _Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200,
                          markup=False, emoji=False)
        encoding = console.encoding

        def safe(s) -> Text:
            return Text(printable(str(s), encoding=encoding))

        ascii_bar = not bar_glyphs_encodable(encoding)
        console.print(Text.assemble(f"nnpatch format {h.version[0]}.{h.version[1]}, {human(p.size)}, made by ",
                                    safe(h.created_by or "?")))
        console.print(Text.assemble("base:   ", safe(h.base.blake3),
                                    f"  {human(h.base.size)}, {h.base.tensors} tensors"))
        console.print(Text.assemble("target: ", safe(h.target.blake3),
                                    f"  {human(h.target.size)}, {h.target.tensors} tensors"))
        console.print(f"trailer BLAKE3: {p.trailer_hash}")
        if signature:
            console.print(f"signed: by key {key_id(signature[0])} (`nnpatch verify --key KEY.pub.pem` checks it)")
        else:
            console.print("signed: no")
        sk = h.target.skeleton
        if sk is not None:
            how = {"zstd-base": "zstd-base: a delta against the base's skeleton", "zstd": "zstd"}
            console.print(f"skeleton: {sk.size} bytes, {sk.length} stored ("
                          + printable(how.get("+".join(sk.codec), "+".join(sk.codec) or "raw"), encoding=encoding)
                          + ")")
        by_index = sum(1 for op in h.ops if is_index_key(op.name))
        if by_index:
            console.print(f"keys: {by_index} tensors are keyed by (subgraph, tensor index), their names stripped "
                          "(TFLite); each op's base BLAKE3 proves it reads the same tensor")
        if h.target.files is not None:
            files = Table(box=None, title="target directory", title_justify="left")
            for col in ("file", "kind", "size", "stored", "from"):
                files.add_column(col, justify="right" if col in ("size", "stored") else "left")
            for f in h.target.files[:MAX_ROWS]:
                files.add_row(safe(f.path), safe(f.kind), str(f.size), str(sum(s.length for s in f.sections())),
                              safe(f.source or ""))
            console.print(files)
            _more(console, h.target.files[MAX_ROWS:], "files", lambda f: f.size, "of files")
        table = Table(box=None)
        for col in ("tensor", "op", "dtype", "shape", "count", "changed", "index codec", "values codec", "bytes"):
            table.add_column(col, justify="right" if col in ("count", "bytes") else "left")
        for op, share in zip(h.ops[:MAX_ROWS], shares):
            ref = op.target or op.base
            table.add_row(safe(op.name), safe(op.kind), safe(ref.dtype), str(list(ref.shape)),
                          "" if op.count is None else str(op.count),
                          "values sent whole" if share.share is None else
                          f"{bar(share.share, ascii=ascii_bar)} {100 * share.share:5.1f}%",
                          safe("+".join(op.index.codec)) if op.index else "",
                          safe("+".join(op.values.codec) or "raw") if op.values else "", str(share.patch_bytes))
        console.print(table)
        _more(console, shares[MAX_ROWS:], "tensors", lambda s: s.patch_bytes, "in the patch")
        if plot_path:
            note = "" if drawn == len(h.ops) else \
                f" (the {drawn} largest of {len(h.ops)} changed tensors, by patch bytes)"
            console.print(Text(f"plot: {printable(plot_path, backslash=False, encoding=encoding)}{note}"))


def _more(console, rest, what: str, size, where: str) -> None:
    """One line for the rows a table leaves out."""
    if rest:
        console.print(f"... and {len(rest):,} more {what} ({human(sum(size(r) for r in rest))} {where}); "
                      "`nnpatch show --json` lists them all")


def changed_elements(p: Patch, op: Op) -> int | None:
    """How many values a ``whole`` op really changes, counted from its delta (a value whose delta
    to the old one is zero is unchanged); None when its values are sent as they are, without the
    old ones to compare with (the patch alone cannot tell which changed)."""
    if op.values is None or codecs.delta_stage(op.values.codec) is None:
        return None
    ref = op.target
    width = dtypes.ITEMSIZE[ref.dtype]
    planar = "planes" in op.values.codec
    numel = op.values.size // width if width else 0
    changed = 0
    sizes = codecs.value_chunk_sizes(numel, width, 1)
    for chunk in codecs.decoded_chunks(p.section(op.values), op.values.codec, op.values.size, sizes,
                                       where=f"{op.name!r}.values"):
        words = chunk.reshape(width, -1) if planar else chunk.reshape(-1, width)
        changed += int(np.count_nonzero(words.any(axis=0 if planar else 1)))
    return changed
