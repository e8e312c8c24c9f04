"""``nnpatch hash``: as quick to start as b3sum's job allows, so it imports no numpy unless --tensors asks."""

from __future__ import annotations

import os
import sys

import click

from .. import errors, hashing
from ..report import printable
from ._common import EXIT_CODES_HELP, emit_json


@click.command("hash", epilog=EXIT_CODES_HELP)
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--tensors", is_flag=True, help="Per-tensor digests and the canonical model digest.")
@click.option("-c", "--check", "check", type=click.Path(dir_okay=False, allow_dash=True),
              help="Check the files listed in a b3sum manifest.")
@click.option("--expect-size", type=click.IntRange(min=0), metavar="BYTES",
              help="With one FILE: exit 1 unless it has exactly this many bytes (catches truncated downloads).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def hash_cmd(ctx, files, tensors, check, expect_size, as_json):
    """BLAKE3 of files (lines `b3sum -c` accepts), of tensors, or check a manifest."""
    if expect_size is not None and (check or len(files) != 1):
        raise click.UsageError("--expect-size takes exactly one FILE")
    if check:
        if files or tensors:
            raise click.UsageError("--check takes no FILES and no --tensors")
        text = sys.stdin.read() if check == "-" else _read_text(check)
        entries = hashing.parse_manifest(text, source=check)
        root = "." if check == "-" else os.path.dirname(check) or "."
        results = hashing.check_manifest(entries, root=root)
        if as_json:
            emit_json({"ok": all(r.ok for r in results),
                       "files": [{"path": r.path, "ok": r.ok, "expected": r.expected, "actual": r.actual,
                                  "error": r.error} for r in results]})
        else:
            for r in results:
                click.echo(f"{r.path}: {'OK' if r.ok else 'FAILED' if r.actual else 'FAILED (' + r.error + ')'}")
        if not all(r.ok for r in results):
            ctx.exit(errors.EXIT_MISMATCH)
        return
    if not files:
        raise click.UsageError("give FILES to hash, or --check MANIFEST")
    out = []
    for path in files:
        entry = {"path": path, "blake3": hashing.hash_file(path)}
        if tensors:
            # The one import kept inside a function: the model readers pull numpy, which plain
            # `nnpatch hash FILE` (a b3sum stand-in, run by scripts) must not pay for at start-up.
            from ..weights import open_model

            with open_model(path) as w:
                model, per = hashing.model_digest(w)
                entry["model_blake3"] = model.hex()
                entry["tensors"] = [{"name": n, "dtype": w.tensors[n].dtype, "shape": list(w.tensors[n].shape),
                                     "blake3": per[n].hex()} for n in sorted(per)]
        out.append(entry)
    size_ok = True
    if expect_size is not None:
        actual = os.path.getsize(files[0])
        size_ok = actual == expect_size
        out[0]["size"] = actual
        out[0]["size_ok"] = size_ok
    if as_json:
        emit_json({"files": out})
    if not size_ok:
        click.echo(f"Error: {files[0]}: {out[0]['size']} bytes, expected {expect_size}", err=True)
        ctx.exit(errors.EXIT_MISMATCH)
    if as_json:
        return
    for e in out:
        click.echo(hashing.manifest_line(e["blake3"], e["path"]))
        if tensors:
            for t in e["tensors"]:
                # tensor names come from the model file: no terminal escapes through
                click.echo(f"  {t['blake3']}  {t['dtype']}{t['shape']}  {printable(t['name'], backslash=False)}")
            click.echo(f"  {e['model_blake3']}  model")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise errors.PatchFormatError("manifest is not UTF-8 text", path=path) from e
    except OSError as e:
        raise errors.NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e
