"""``nnpatch hash``: as quick to start as b3sum's job allows, so it imports no numpy unless
--tensors or a model directory asks for the model readers."""

from __future__ import annotations

import os

import click

from .. import errors, hashing, sidefile
from ..report import printable
from ._common import InputPath, emit_json, json_option


@click.command("hash")
@click.argument("files", nargs=-1, type=InputPath())
@click.option("--tensors", is_flag=True, help="Per-tensor digests and the canonical model digest.")
@click.option("-c", "--check", "check", type=InputPath(dir_okay=False, allow_dash=True, what="manifest file"),
              help="Check the files listed in a b3sum manifest (names relative to the current directory, "
                   "as b3sum -c reads them); '-' reads it from standard input.")
@click.option("--expect-size", type=click.IntRange(min=0), metavar="BYTES",
              help="With one FILE: exit 1 unless it has exactly this many bytes (catches truncated downloads).")
@json_option()
@click.pass_context
def hash_cmd(ctx, files, tensors, check, expect_size, as_json):
    """BLAKE3 of files or model directories (lines `b3sum -c` accepts), of tensors, or check a manifest.

    A model directory's line carries its directory digest (spec/FORMAT.md,
    section 8): the digest patches, release manifests and `show` name it by.
    """
    if expect_size is not None and (check or len(files) != 1):
        raise click.UsageError("--expect-size takes exactly one FILE")
    if check:
        if files or tensors:
            raise click.UsageError("--check takes no FILES and no --tensors")
        entries = hashing.parse_manifest(hashing.read_checksum_list(check), source=check)
        # as b3sum -c: names are relative to the current directory, not to the manifest's
        results = [_check_directory(r) if r.actual is None and os.path.isdir(r.path) else r
                   for r in hashing.check_manifest(entries, root=".")]
        if as_json:
            emit_json({"ok": all(r.ok for r in results),
                       "files": [{"path": r.path, "ok": r.ok, "expected": r.expected, "actual": r.actual,
                                  "error": r.error} for r in results]})
        else:
            for r in results:
                status = "OK" if r.ok else "FAILED" if r.actual else f"FAILED ({r.error})"
                click.echo(f"{_b3sum_name(r.path)}: {status}")
        if not all(r.ok for r in results):
            ctx.exit(errors.EXIT_MISMATCH)
        return
    if not files:
        raise click.UsageError("give FILES to hash, or --check MANIFEST")
    out = []
    for path in files:
        if sidefile.interrupted(path):  # its bytes are neither version: say so, as b3sum never could
            click.echo(f"warning: {printable(path, backslash=False)}: an in-place update of it was interrupted "
                       f"(undo journal beside it): this is the digest of a half-written file; run `nnpatch "
                       f"recover` first", err=True)
        directory = os.path.isdir(path)
        if directory:
            # Deferred, as for --tensors: the model readers pull numpy, which plain `nnpatch hash FILE`
            # (a b3sum stand-in, run by scripts) must not pay for at start-up.
            from ..weights.source import path_digest

            digest, size = path_digest(path)
            entry = {"path": path, "blake3": digest, "directory": True}
        else:
            entry = {"path": path, "blake3": hashing.hash_file(path)}
            size = None
        if tensors:
            from ..weights import open_model

            with open_model(path) as w:
                model, per = hashing.model_digest(w)
                entry["model_blake3"] = model.hex()
                entry["tensors"] = [{"name": n, "dtype": w.tensors[n].dtype, "shape": list(w.tensors[n].shape),
                                     "blake3": per[n].hex()} for n in sorted(per)]
        out.append((entry, size))
    size_ok = True
    if expect_size is not None:
        entry, size = out[0]
        actual = size if size is not None else os.path.getsize(files[0])
        size_ok = actual == expect_size
        entry["size"] = actual
        entry["size_ok"] = size_ok
    entries = [e for e, _ in out]
    if as_json:
        emit_json({"files": entries})
    if not size_ok:
        click.echo(f"Error: {files[0]}: {entries[0]['size']} bytes, expected {expect_size}", err=True)
        ctx.exit(errors.EXIT_MISMATCH)
    if as_json:
        return
    for e in entries:
        click.echo(hashing.manifest_line(e["blake3"], e["path"]))
        if tensors:
            for t in e["tensors"]:
                # tensor names come from the model file: no terminal escapes through
                click.echo(f"  {t['blake3']}  {t['dtype']}{t['shape']}  {printable(t['name'], backslash=False)}")
            click.echo(f"  {e['model_blake3']}  model")


def _check_directory(r: hashing.CheckResult) -> hashing.CheckResult:
    """A manifest line that names a model directory (as `nnpatch hash DIR` writes): its directory digest."""
    from ..weights.source import path_digest  # deferred: numpy only when a directory is checked

    try:
        return hashing.CheckResult(r.path, r.expected, path_digest(r.path)[0])
    except errors.NnpatchError as e:
        return hashing.CheckResult(r.path, r.expected, None, str(e))


def _b3sum_name(path: str) -> str:
    """A name as ``b3sum -c`` prints it: escaped, with a leading backslash, when it holds one, or a line break."""
    if "\\" in path or "\n" in path or "\r" in path:
        return "\\" + path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return path

