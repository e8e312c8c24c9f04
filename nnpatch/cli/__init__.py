"""The ``nnpatch`` command: parse arguments, call the API, render the result.

Exit codes: 0 ok; 1 verify ran and found a mismatch; 2 usage error; 3 invalid
or corrupt input file; 4 wrong base or integrity failure; 5 I/O error;
130 interrupted. Errors are one line on stderr; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .. import __version__, codecs, errors

EXIT_CODES_HELP = """\b
Exit codes:
  0  ok
  1  verify ran and found a mismatch
  2  usage error
  3  invalid or corrupt input file (patch or model)
  4  wrong base, or an integrity check failed
  5  I/O error
  130 interrupted"""


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Turns every nnpatch error into one line and its documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except errors.NnpatchError as e:
            if _debug(ctx):
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            if _debug(ctx):
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"Error: {where}{e.strerror or e}", err=True)
            ctx.exit(errors.EXIT_IO)
        except KeyboardInterrupt:
            click.echo("Aborted", err=True)
            ctx.exit(errors.EXIT_INTERRUPTED)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


def _quiet(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("quiet"))


def _version_text() -> str:
    from .. import kernel

    return f"nnpatch {__version__} (format {'.'.join(map(str, _format_version()))}, kernel {kernel.backend})"


def _format_version():
    from ..patchfile import FORMAT_VERSION

    return FORMAT_VERSION


@click.group(cls=_Group, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(__version__, "--version", message="%(version)s", prog_name="nnpatch")
def cli(debug: bool, quiet: bool) -> None:
    """Small, exact, verifiable patches for neural-network weights."""


# click's version_option prints a fixed string; show the active kernel as well.
for _p in cli.params:
    if isinstance(_p, click.Option) and "--version" in _p.opts:
        def _show_version(ctx, param, value):
            if value and not ctx.resilient_parsing:
                click.echo(_version_text())
                ctx.exit(0)
        _p.callback = _show_version


@contextlib.contextmanager
def _progress(ctx: click.Context, label: str, total: int, enabled: bool = True):
    """A byte progress bar on stderr, only when it is a terminal and wanted."""
    console = _stderr()
    if not enabled or _quiet(ctx) or not console.is_terminal:
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


def _model_size(path: str) -> int:
    """Bytes of a model file or directory (for progress bars); 0 when unreadable."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                   if os.path.isfile(os.path.join(d, f)))
    return os.path.getsize(path) if os.path.exists(path) else 0


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- diff ---------------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
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
    from ..differ import diff as make_diff

    total = os.path.getsize(new) if os.path.exists(new) else 0
    with _progress(ctx, "diff", total, not as_json) as advance:
        result = make_diff(old, new, output, level=level, reversible=reversible, sign_key=sign_key,
                           progress=advance)
    if as_json:
        _emit_json(_diff_json(result))
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
        click.echo(f" {name:<{name_w}} | {what:>18} {_human(c.patch_bytes):>10} {bar}")
    added = sum(c.op == "add" for c in r.changes)
    removed = sum(c.op == "remove" for c in r.changes)
    click.echo(f" {len(r.changes)} of {r.tensors_total} tensors changed ({added} added, {removed} removed); "
               f"patch {_human(r.patch_size)} = {100 * r.ratio:.2f}% of the target ({_human(r.target_size)})")


# --- apply ---------------------------------------------------------------------

_VERIFY_HELP = ("default: hash the whole base and every touched tensor, which proves the output without reading it "
                "again; full: also re-hash the whole output; touched: only touched tensors (fastest; an untouched "
                "tensor that differs in the base goes undetected).")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("old", type=click.Path())
@click.argument("patches", nargs=-1, required=True, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-o", "--output", type=click.Path(),
              help="Model file to write (replaced atomically); a new directory for a patch whose target is a "
                   "model directory.")
@click.option("--in-place", is_flag=True,
              help="Update OLD itself, writing only the changed rows, behind an undo journal (crash-safe).")
@click.option("--verify", "verify_mode", type=click.Choice(["default", "full", "touched"]), default="default",
              show_default=True, help=_VERIFY_HELP)
@click.option("--key", type=click.Path(dir_okay=False),
              help="Refuse any patch not signed by this Ed25519 public key (PEM); exit 4.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def apply(ctx, old, patches, output, in_place, verify_mode, key, as_json):
    """Rebuild the patched model from OLD and PATCH, checked by hash.

    \b
    Several patches apply as a chain in one pass (nothing intermediate is written).
    PATCH '-' reads the patch from standard input; the output is committed only
    after the stream's trailer hash checks out.
    """
    from ..applier import apply_chain

    if in_place == bool(output):
        raise click.UsageError("give either -o OUTPUT or --in-place")
    if list(patches).count("-") > 1:
        raise click.UsageError("standard input can hold only one patch")
    with contextlib.ExitStack() as stack:
        opened = []
        for p in patches:
            if p == "-":
                from ..patchfile import read_patch_stream

                where = os.path.dirname(os.path.abspath(output or old))
                opened.append(stack.enter_context(read_patch_stream(directory=where)))
            else:
                opened.append(p)
        total = _model_size(old)
        with _progress(ctx, "apply", total * (len(opened) if in_place else 1), not as_json) as advance:
            if in_place:
                from ..applier import apply_in_place

                if key is not None:
                    from ..patchfile import read_patch
                    from ..signing import verify_signature

                    for p in opened:
                        if isinstance(p, str):
                            with read_patch(p) as q:
                                verify_signature(q, key)
                        else:
                            verify_signature(p, key)
                for p in opened:
                    r = apply_in_place(old, p, verify=verify_mode, progress=advance)
            else:
                r = apply_chain(old, opened, output, verify=verify_mode, progress=advance, key=key)
    if as_json:
        _emit_json({"output": r.output, "size": r.size, "blake3": r.blake3, "ops": r.ops, "verify": r.verify,
                    "links": len(opened), "in_place": in_place})
    elif not _quiet(ctx):
        how = "file re-hashed" if r.verify == "full" else (
            "base and every tensor written" if r.verify == "default" else "touched tensors only")
        click.echo(f"wrote {r.output} ({_human(r.size)}, BLAKE3 {r.blake3}), verified: {how}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("new", type=click.Path(dir_okay=False))
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (replaced atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def revert(ctx, new, patch, output, as_json):
    """Rebuild the old model from NEW and a reversible PATCH (made with diff --reversible)."""
    from ..applier import revert as do_revert

    total = os.path.getsize(new) if os.path.exists(new) else 0
    with _progress(ctx, "revert", total, not as_json) as advance:
        r = do_revert(new, patch, output, progress=advance)
    if as_json:
        _emit_json({"output": r.output, "size": r.size, "blake3": r.blake3, "ops": r.ops})
    elif not _quiet(ctx):
        click.echo(f"wrote {r.output} ({_human(r.size)}, BLAKE3 {r.blake3}), verified")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def recover(ctx, model, as_json):
    """Finish off an interrupted in-place apply: roll MODEL back to exactly what it was."""
    from ..applier import recover as do_recover

    note = do_recover(model)
    if as_json:
        _emit_json({"model": model, "recovered": note is not None, "detail": note or "nothing to recover"})
    elif not _quiet(ctx):
        click.echo(f"{model}: {note or 'nothing to recover'}")


# --- verify ---------------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--base", type=click.Path(), help="Check that this is the patch's base.")
@click.option("--target", type=click.Path(), help="Check that this is the patch's target.")
@click.option("--key", type=click.Path(dir_okay=False), help="Require a signature by this Ed25519 public key.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def verify(ctx, patch, base, target, key, as_json):
    """Check a patch's integrity, and optionally its base, target and signature."""
    from ..verifier import verify as do_verify

    report = do_verify(patch, base=base, target=target, key=key)
    if as_json:
        _emit_json({"patch": report.patch, "ok": report.ok,
                    "checks": [{"what": c.what, "ok": c.ok, "detail": c.detail} for c in report.checks]})
    else:
        for c in report.checks:
            click.echo(f"{c.what}: {'OK' if c.ok else 'FAILED'}  {c.detail}")
    if not report.ok:
        ctx.exit(errors.EXIT_MISMATCH)


# --- signatures -------------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
@click.option("-o", "--output", "prefix", required=True, type=click.Path(dir_okay=False),
              help="Writes PREFIX.pem (private, mode 0600) and PREFIX.pub.pem.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
def keygen(prefix, as_json):
    """Make an Ed25519 key pair for signing patches."""
    from ..signing import generate_keypair

    private, public = f"{prefix}.pem", f"{prefix}.pub.pem"
    kid = generate_keypair(private, public)
    if as_json:
        _emit_json({"private_key": private, "public_key": public, "key_id": kid})
    else:
        click.echo(f"wrote {private} (keep it secret) and {public}; key id {kid}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Ed25519 private key (PEM).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the signed patch here (default: in place).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
def sign(patch, key, output, as_json):
    """Sign a patch (its trailer hash, which covers every byte)."""
    from ..signing import sign_patch

    kid = sign_patch(patch, key, output)
    if as_json:
        _emit_json({"patch": output or patch, "key_id": kid})
    else:
        click.echo(f"signed {output or patch} with key {kid}")


# --- hash -------------------------------------------------------------------------

@cli.command("hash", epilog=EXIT_CODES_HELP)
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
    from .. import hashing

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
            _emit_json({"ok": all(r.ok for r in results),
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
        _emit_json({"files": out})
    if not size_ok:
        click.echo(f"Error: {files[0]}: {out[0]['size']} bytes, expected {expect_size}", err=True)
        ctx.exit(errors.EXIT_MISMATCH)
    if as_json:
        return
    for e in out:
        click.echo(hashing.manifest_line(e["blake3"], e["path"]))
        if tensors:
            for t in e["tensors"]:
                click.echo(f"  {t['blake3']}  {t['dtype']}{t['shape']}  {t['name']}")
            click.echo(f"  {e['model_blake3']}  model")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise errors.PatchFormatError("manifest is not UTF-8 text", path=path) from e
    except OSError as e:
        raise errors.NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e


# --- release sets -----------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("olds", nargs=-1, required=True, type=click.Path())
@click.option("--to", "new", required=True, type=click.Path(), help="The new version (a file or model directory).")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Directory for the patches and manifest.json.")
@click.option("--level", type=click.IntRange(codecs.MIN_LEVEL, codecs.MAX_LEVEL), default=codecs.DEFAULT_LEVEL,
              show_default=True, help="zstd level.")
@click.option("--chain", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Also record a chain through intermediate versions: where smaller, always, or never.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest to stdout.")
def release(olds, new, outdir, level, chain, as_json):
    """Patches from every old version to the new one, plus a manifest for updaters."""
    from ..release import make_release

    manifest = make_release(list(olds), new, outdir, level=level, chain=chain)
    if as_json:
        _emit_json(manifest)
        return
    click.echo(f"wrote {len(manifest.get('bases', []))} patches and {os.path.join(outdir, 'manifest.json')}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path())
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="manifest.json of a release.")
@click.option("--patch-dir", type=click.Path(file_okay=False), help="Where the patches are (default: beside it).")
@click.option("--prefer", type=click.Choice(["direct", "smallest", "chain"]), default="direct", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
def update(model, manifest, patch_dir, prefer, as_json):
    """Bring MODEL to a release's version with the right patch, checked by hash."""
    from ..release import update as do_update

    r = do_update(model, manifest, patch_dir=patch_dir, prefer=prefer)
    if as_json:
        _emit_json({"path": r.path, "updated": r.updated, "from_blake3": r.from_blake3, "to_blake3": r.to_blake3,
                    "patches": r.patches, "patch_bytes": r.patch_bytes})
    elif r.updated:
        click.echo(f"updated {r.path} with {', '.join(r.patches)} ({_human(r.patch_bytes)}); BLAKE3 {r.to_blake3}")
    else:
        click.echo(f"{r.path} is already the release's version")


# --- textconv -------------------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("file", type=click.Path())
def textconv(file):
    """A stable text summary of a model, for `git diff` (see the README)."""
    from .. import hashing
    from ..weights import open_model

    with open_model(file) as w:
        model, per = hashing.model_digest(w)
        click.echo(f"{w.kind}: {len(w.tensors)} tensors, {sum(f.size for f in w.files)} bytes")
        click.echo(f"model blake3: {model.hex()}")
        for key in sorted(w.metadata or {}):
            click.echo(f"metadata {key}: {w.metadata[key]}")
        for name in sorted(w.tensors, key=lambda n: n.encode("utf-8", "surrogatepass")):
            info = w.tensors[name]
            shape = "x".join(map(str, info.shape)) or "scalar"
            click.echo(f"{name}  {info.dtype}  {shape}  {per[name].hex()[:16]}")


# --- show -------------------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON to stdout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw per-tensor changed share and patch bytes to this image (PNG, SVG or PDF; needs "
                   "matplotlib: pip install 'nnpatch[plot]').")
def show(patch, as_json, plot_path):
    """Print a patch's header and a per-tensor table."""
    from ..patchfile import read_patch
    from ..report import bar, plot, tensor_shares

    with read_patch(patch) as p:
        h = p.header
        if plot_path:
            plot(h, plot_path, title=os.path.basename(patch))
        if as_json:
            obj = h.to_json()
            obj["version"] = f"{h.version[0]}.{h.version[1]}"
            obj["size"] = p.size
            obj["trailer_blake3"] = p.trailer_hash
            _emit_json(obj)
            return
        console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
        console.print(f"nnpatch format {h.version[0]}.{h.version[1]}, {_human(p.size)}, made by {h.created_by or '?'}")
        console.print(f"base:   {h.base.blake3}  {_human(h.base.size)}, {h.base.tensors} tensors")
        console.print(f"target: {h.target.blake3}  {_human(h.target.size)}, {h.target.tensors} tensors")
        console.print(f"trailer BLAKE3: {p.trailer_hash}")
        if h.target.files is not None:
            files = Table(box=None, title="target directory", title_justify="left")
            for col in ("file", "kind", "size", "stored", "from"):
                files.add_column(col, justify="right" if col in ("size", "stored") else "left")
            for f in h.target.files:
                files.add_row(f.path, f.kind, str(f.size), str(sum(s.length for s in f.sections())), f.source or "")
            console.print(files)
        table = Table(box=None)
        for col in ("tensor", "op", "dtype", "shape", "count", "changed", "index codec", "values codec", "bytes"):
            table.add_column(col, justify="right" if col in ("count", "bytes") else "left")
        for op, share in zip(h.ops, tensor_shares(h)):
            ref = op.target or op.base
            table.add_row(op.name, op.kind, ref.dtype, str(list(ref.shape)),
                          "" if op.count is None else str(op.count),
                          f"{bar(share.share)} {100 * share.share:5.1f}%",
                          "+".join(op.index.codec) if op.index else "",
                          ("+".join(op.values.codec) or "raw") if op.values else "", str(share.patch_bytes))
        console.print(table)
        if plot_path:
            console.print(f"plot: {plot_path}")


# --- demo ---------------------------------------------------------------------------

@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--dir", "directory", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where to write the demo files.")
@click.option("--synthetic", is_flag=True, help="Use generated models instead of training (no torch needed).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def demo(ctx, directory, synthetic, as_json):
    """Train, update with train-sparse, diff, apply and verify on built-in data."""
    from ..demo import run_demo

    result = run_demo(directory, echo=(lambda s: None) if as_json else click.echo, synthetic=synthetic or None)
    if as_json:
        _emit_json(result)


def _register_optional() -> None:
    try:
        from ..trainer.command import train_sparse
    except ImportError:
        return
    cli.add_command(train_sparse, "train-sparse")


_register_optional()


def main() -> None:
    cli(prog_name="nnpatch")


if __name__ == "__main__":  # pragma: no cover
    main()
