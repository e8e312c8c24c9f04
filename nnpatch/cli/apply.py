"""``nnpatch apply``, ``revert`` and ``recover``: the commands that build a model from a patch."""

from __future__ import annotations

import contextlib
import os

import click

from ..applier import apply_chain, apply_in_place
from ..applier import recover as do_recover
from ..applier import revert as do_revert
from ..patchfile import read_patch_stream
from ..report import printable
from ..signing import authenticator
from ._common import InputPath, emit_json, human, json_option, quiet
from ._inputs import check_order, check_public_key
from ._progress import model_size, progress

_VERIFY_HELP = ("Every mode re-hashes the output against the patch's file digest. default: also hash the whole "
                "base and every touched tensor (a wrong base is named as such); full: the same as default; "
                "touched: only touched tensors besides the output (fastest; a base that differs elsewhere is "
                "refused as a wrong result).")


@click.command()
@click.argument("old", type=InputPath())
@click.argument("patches", nargs=-1, required=True, type=InputPath(dir_okay=False, allow_dash=True, what="patch file"))
@click.option("-o", "--output", type=click.Path(),
              help="Model file to write (replaced atomically); a new directory for a patch whose target is a "
                   "model directory.")
@click.option("--in-place", is_flag=True,
              help="Update OLD itself, writing only the changed rows, behind an undo journal (crash-safe).")
@click.option("--verify", "verify_mode", type=click.Choice(["default", "full", "touched"]), default="default",
              show_default=True, help=_VERIFY_HELP)
@click.option("--key", type=InputPath(dir_okay=False, what="key file"),
              help="Refuse any patch not signed by this Ed25519 public key (PEM); exit 4.")
@json_option()
@click.pass_context
def apply(ctx, old, patches, output, in_place, verify_mode, key, as_json):
    """Rebuild the patched model from OLD and PATCH, checked by hash.

    \b
    Several patches apply as a chain in one pass (nothing intermediate is written).
    PATCH '-' reads the patch from standard input; the output is committed only
    after the stream's trailer hash checks out.
    """
    if in_place == bool(output):
        raise click.UsageError("give either -o OUTPUT or --in-place")
    if list(patches).count("-") > 1:
        raise click.UsageError("standard input can hold only one patch")
    check_order("nnpatch apply OLD PATCH... -o OUTPUT (or --in-place)",
                models={"OLD": old}, patches={f"PATCH {i + 1}" if i else "PATCH": p for i, p in enumerate(patches)})
    check_public_key(key)
    with contextlib.ExitStack() as stack:
        opened = []
        for p in patches:
            if p == "-":
                where = os.path.dirname(os.path.abspath(output or old))
                # with a key, nothing of the header is expanded or parsed before the signature checks out
                opened.append(stack.enter_context(read_patch_stream(
                    directory=where, authenticate=authenticator(key) if key is not None else None)))
            else:
                opened.append(p)
        total = model_size(old)
        with progress(ctx, "apply", total * (len(opened) if in_place else 1), not as_json) as advance:
            if in_place:
                for p in opened:
                    r = apply_in_place(old, p, verify=verify_mode, progress=advance, key=key)
            else:
                r = apply_chain(old, opened, output, verify=verify_mode, progress=advance, key=key)
    if as_json:
        emit_json({"output": r.output, "size": r.size, "blake3": r.blake3, "model_blake3": r.model_blake3,
                   "ops": r.ops, "verify": r.verify, "links": len(opened), "in_place": in_place})
    elif not quiet(ctx):
        how = "touched tensors and the file" if r.verify == "touched" else "base, every tensor written and the file"
        click.echo(f"wrote {r.output} ({human(r.size)}{_proven_digest(r)}), verified: {how}")


def _proven_digest(r) -> str:
    """The digest the apply proved, for the success line: never a patch's unchecked claim."""
    if r.blake3 is not None:
        return f", BLAKE3 {r.blake3}"
    if r.model_blake3 is not None:
        return f", model BLAKE3 {r.model_blake3}"
    return ""


@click.command()
@click.argument("new", type=InputPath(dir_okay=False, what="model file"))
@click.argument("patch", type=InputPath(dir_okay=False, what="patch file"))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (replaced atomically).")
@json_option()
@click.pass_context
def revert(ctx, new, patch, output, as_json):
    """Rebuild the old model from NEW and a reversible PATCH (made with diff --reversible)."""
    check_order("nnpatch revert NEW PATCH -o OUTPUT", models={"NEW": new}, patches={"PATCH": patch})
    total = os.path.getsize(new) if os.path.exists(new) else 0
    with progress(ctx, "revert", total, not as_json) as advance:
        r = do_revert(new, patch, output, progress=advance)
    if as_json:
        emit_json({"output": r.output, "size": r.size, "blake3": r.blake3, "model_blake3": r.model_blake3,
                   "ops": r.ops})
    elif not quiet(ctx):
        click.echo(f"wrote {r.output} ({human(r.size)}, BLAKE3 {r.blake3}), verified")


@click.command()
@click.argument("model", type=InputPath())
@json_option()
@click.pass_context
def recover(ctx, model, as_json):
    """Finish off an interrupted in-place apply: roll MODEL back to exactly what it was."""
    note = do_recover(model)
    if as_json:
        emit_json({"model": model, "recovered": note is not None, "detail": note or "nothing to recover"})
    elif not quiet(ctx):
        click.echo(f"{model}: {printable(note or 'nothing to recover', backslash=False)}")  # from the journal
