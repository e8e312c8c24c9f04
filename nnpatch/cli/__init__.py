"""The ``nnpatch`` command: parse arguments, call the API, render the result.

Exit codes: 0 ok; 1 verify ran and found a mismatch; 2 usage error; 3 invalid
or corrupt input file; 4 wrong base or integrity failure; 5 I/O error;
130 interrupted. Errors are one line on stderr; ``--debug`` shows tracebacks.

Each command lives in a module of this package, imported only when that
command runs (or when help lists every command): ``nnpatch --version`` and
``nnpatch hash FILE`` then start without numpy, zstandard or the applier.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__, errors
from ..report import printable
from ._common import EXIT_CODES_HELP, debug

#: command name -> (module of this package, attribute)
_COMMANDS = {
    "apply": ("apply", "apply"),
    "demo": ("demo", "demo"),
    "diff": ("diff", "diff"),
    "hash": ("hash", "hash_cmd"),
    "keygen": ("keys", "keygen"),
    "recover": ("apply", "recover"),
    "release": ("release", "release"),
    "revert": ("apply", "revert"),
    "show": ("show", "show"),
    "sign": ("keys", "sign"),
    "textconv": ("textconv", "textconv"),
    "update": ("release", "update"),
    "verify": ("verify", "verify"),
}
#: Commands that exist only where their module imports (the trainer may be left out of an install).
_OPTIONAL = ("train-sparse",)

#: ``nnpatch.patchfile.FORMAT_VERSION``, for ``--version`` only: importing the patch-file package
#: pulls numpy and zstandard (its codecs), five times the rest of start-up.  tests/test_cli_startup.py
#: fails when the two differ.
_FORMAT_VERSION = (1, 2)


class _Group(click.Group):
    """Loads each command's module on first use, and turns every nnpatch error
    into one line and its documented exit code: the one handler for every
    command, lazily loaded or added with ``add_command``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands) | set(_COMMANDS)
        names.update(n for n in _OPTIONAL if self.get_command(ctx, n) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is None:
            cmd = _load(cmd_name)
            if cmd is not None:
                self.commands[cmd_name] = cmd
        return cmd

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except errors.NnpatchError as e:
            if debug(ctx):
                raise
            click.echo(f"Error: {_one_line(str(e))}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            if debug(ctx):
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"Error: {_one_line(f'{where}{e.strerror or e}')}", err=True)
            ctx.exit(errors.EXIT_IO)
        except KeyboardInterrupt:
            click.echo("Aborted", err=True)
            ctx.exit(errors.EXIT_INTERRUPTED)


def _one_line(message: str) -> str:
    # Messages may quote a patch or model (names, paths): no terminal escapes, no second line.
    # Backslashes stay single: they are the message's own far more often than a hostile name's.
    return printable(message, backslash=False)


def _load(name: str) -> click.Command | None:
    if name == "train-sparse":
        try:
            from nnpatch.trainer.command import train_sparse
        except ImportError:
            return None
        return train_sparse
    if name not in _COMMANDS:
        return None
    module, attr = _COMMANDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def _version_text() -> str:
    return f"nnpatch {__version__} (format {'.'.join(map(str, _FORMAT_VERSION))}, kernel {_kernel_backend()})"


def _kernel_backend() -> str:
    """``nnpatch.kernel.backend``, without importing nnpatch.kernel (and numpy) when it is not loaded.

    The same choice the module makes at import (``NNPATCH_KERNEL``, default
    auto: ``c`` when the extension imports); a value the module would refuse
    is left to the module, so that it fails exactly as it does everywhere.
    """
    loaded = sys.modules.get("nnpatch.kernel")
    if loaded is not None:  # authoritative, and kernel.select() may have switched it
        return loaded.backend
    name = os.environ.get("NNPATCH_KERNEL", "auto").strip().lower() or "auto"
    if name == "numpy":
        return name
    if name in ("auto", "c"):
        try:
            from .. import _kernel  # noqa: F401  the C extension alone imports no numpy
        except ImportError:
            if name == "auto":
                return "numpy"
        else:
            return "c"
    from .. import kernel

    return kernel.backend


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())
        ctx.exit(0)


@click.group(cls=_Group, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
def cli(debug: bool, quiet: bool) -> None:
    """Small, exact, verifiable patches for neural-network weights."""


def main() -> None:
    cli(prog_name="nnpatch")


if __name__ == "__main__":  # pragma: no cover
    main()
