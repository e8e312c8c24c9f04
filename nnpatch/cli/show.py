"""``nnpatch show``: a patch's header for people.

Everything a patch says is untrusted: each string from it goes through
:func:`nnpatch.report.printable` (no terminal escapes, nothing the output
encoding cannot carry) and is printed as plain text, never as rich markup or
emoji codes."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..patchfile import read_patch
from ..report import bar, bar_glyphs_encodable, plot, printable, tensor_shares
from ._common import EXIT_CODES_HELP, emit_json, human


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON to stdout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw per-tensor changed share and patch bytes to this image (PNG, SVG or PDF; needs "
                   "matplotlib: pip install 'nnpatch[plot]').")
def show(patch, as_json, plot_path):
    """Print a patch's header and a per-tensor table."""
    with read_patch(patch) as p:
        h = p.header
        if plot_path:
            plot(h, plot_path, title=os.path.basename(patch))
        if as_json:
            obj = h.to_json()
            obj["version"] = f"{h.version[0]}.{h.version[1]}"
            obj["size"] = p.size
            obj["trailer_blake3"] = p.trailer_hash
            emit_json(obj)
            return
        console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200,
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
        if h.target.files is not None:
            files = Table(box=None, title="target directory", title_justify="left")
            for col in ("file", "kind", "size", "stored", "from"):
                files.add_column(col, justify="right" if col in ("size", "stored") else "left")
            for f in h.target.files:
                files.add_row(safe(f.path), safe(f.kind), str(f.size), str(sum(s.length for s in f.sections())),
                              safe(f.source or ""))
            console.print(files)
        table = Table(box=None)
        for col in ("tensor", "op", "dtype", "shape", "count", "changed", "index codec", "values codec", "bytes"):
            table.add_column(col, justify="right" if col in ("count", "bytes") else "left")
        for op, share in zip(h.ops, tensor_shares(h)):
            ref = op.target or op.base
            table.add_row(safe(op.name), safe(op.kind), safe(ref.dtype), str(list(ref.shape)),
                          "" if op.count is None else str(op.count),
                          f"{bar(share.share, ascii=ascii_bar)} {100 * share.share:5.1f}%",
                          safe("+".join(op.index.codec)) if op.index else "",
                          safe("+".join(op.values.codec) or "raw") if op.values else "", str(share.patch_bytes))
        console.print(table)
        if plot_path:
            console.print(Text(f"plot: {printable(plot_path, backslash=False, encoding=encoding)}"))
