"""What every command module shares; click, the standard library and ``nnpatch.errors`` only,
so that a command as light as ``hash`` stays light."""

from __future__ import annotations

import json
import os
import stat

import click

from .. import errors

#: The exit-code table: in ``nnpatch --help`` only (each command's help would repeat it).
EXIT_CODES_HELP = """\b
Exit codes:
  0  ok
  1  verify or hash --check ran and found a mismatch
  2  usage error
  3  invalid or corrupt input file (patch, model or manifest)
  4  wrong base, or an integrity check failed
  5  I/O error (unreadable or missing file, disk full)
  6  train-sparse: the code named by --model or --data failed
  7  update: no patch leads from the model's version (download it whole)
  130 interrupted (143: terminated by SIGTERM)"""

#: Where the root context keeps flags that may also be given after the subcommand.
_FLAGS = "nnpatch.flags"


def _flag(ctx: click.Context, name: str) -> bool:
    root = ctx.find_root()
    return bool(root.params.get(name)) or name in root.meta.get(_FLAGS, ())


def debug(ctx: click.Context) -> bool:
    return _flag(ctx, "debug")


def quiet(ctx: click.Context) -> bool:
    return _flag(ctx, "quiet")


def set_flag(ctx: click.Context, name: str) -> None:
    ctx.find_root().meta.setdefault(_FLAGS, set()).add(name)


def say(ctx: click.Context, text: str) -> None:
    """A success or status line: stdout, unless --quiet (which leaves stdout empty on success)."""
    if not quiet(ctx):
        click.echo(text)


def emit_json(obj) -> None:
    """A command's JSON object. Every object says whether the command succeeded: ``ok`` is true
    unless the object gives its own verdict (verify, hash --check, update, the error object)."""
    if "ok" not in obj:
        obj = {"ok": True, **obj}
    # ensure_ascii (json's default) on purpose: names from a patch may hold lone surrogates, which
    # only an escape can carry, and the output then fits any stdout encoding.
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def json_option(help: str = "Print a JSON object to stdout (and a JSON error object on failure).", **kw):
    return click.option("--json", "as_json", is_flag=True, help=help, **kw)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class InputPath(click.ParamType):
    """A file (or, with ``dir_okay``, a model directory) the command will read.

    Unlike ``click.Path`` it never makes an unreadable input a usage error:
    a directory where a file is needed, or a file that cannot be read, is an
    I/O error (exit 5) in one ``Error:`` line, as a missing file is (the
    command's own open reports that one)."""

    name = "path"

    def __init__(self, *, dir_okay: bool = True, allow_dash: bool = False, what: str = "file") -> None:
        self.dir_okay = dir_okay
        self.allow_dash = allow_dash
        self.what = what

    def convert(self, value, param, ctx):
        value = os.fspath(value)
        if self.allow_dash and value == "-":
            return value
        try:
            st = os.stat(value)
        except OSError:
            return value  # missing (or a dangling link): the command's open names it, exit 5
        if stat.S_ISDIR(st.st_mode):
            if not self.dir_okay:
                raise errors.NnpatchIOError(f"{value}: is a directory, expected a {self.what}")
            readable = os.access(value, os.R_OK | os.X_OK)
        else:
            readable = os.access(value, os.R_OK)
        if not readable:
            raise errors.NnpatchIOError(f"{value}: cannot read: Permission denied")
        return value
