"""The ``nnpatch`` command: parse arguments, call the API, render the result.

Exit codes: 0 ok; 1 verify ran and found a mismatch; 2 usage error; 3 invalid
or corrupt input file; 4 wrong base or integrity failure; 5 I/O error;
130 interrupted (143 on SIGTERM). Errors are one line on stderr (with
``--json``, also a JSON error object on stdout); ``--debug`` shows tracebacks.
A closed standard output (``nnpatch diff ... | head``) stops output quietly.

Each command lives in a module of this package, imported only when that
command runs (or when help lists every command): ``nnpatch --version`` and
``nnpatch hash FILE`` then start without numpy, zstandard or the applier.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys

import click

from .. import errors
from .._version import __version__
from ..report import printable
from ._common import EXIT_CODES_HELP, debug, emit_json, set_flag

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
_FORMAT_VERSION = (1, 5)


class _Group(click.Group):
    """Loads each command's module on first use, and turns every error into one
    ``Error:`` line and its documented exit code (with ``--json``, also a JSON
    error object on stdout): the one handler for every command, lazily loaded
    or added with ``add_command``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands) | set(_COMMANDS)
        names.update(n for n in _OPTIONAL if self.get_command(ctx, n) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is None:
            cmd = _load(cmd_name)
            if cmd is not None:
                _adopt(cmd)
                self.commands[cmd_name] = cmd
        return cmd

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _adopt(cmd)
        super().add_command(cmd, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)  # for the error handler: was --json (or --debug) given anywhere?
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click cuts each summary to the width left on the line ("..."); wrapping keeps all of it
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1 << 16)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException as e:  # bad options or arguments: click's own usage message
            if debug(ctx) or not _wants_json(ctx):
                raise
            e.show()
            _emit_error(e.exit_code, type(e).__name__, e.format_message())
            ctx.exit(e.exit_code)
        except errors.NnpatchError as e:
            if debug(ctx) or _argv_has(ctx, "--debug"):
                raise
            _fail(ctx, e.exit_code, type(e).__name__, str(e))
        except OSError as e:
            if e.errno == errno.EPIPE:  # the reader went away (`| head`): stop quietly, keep the work done
                _stdout_to_devnull()
                ctx.exit(0)
            if debug(ctx) or _argv_has(ctx, "--debug"):
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            message = f"{where}{e.strerror or e}"
            if e.errno == errno.ENOSPC:
                message += " (free some space and run it again; the README lists the space each command needs)"
            _fail(ctx, errors.EXIT_IO, type(e).__name__, message)
        except KeyboardInterrupt as e:
            if debug(ctx) or _argv_has(ctx, "--debug"):
                raise
            if isinstance(e, _Terminated):
                _fail(ctx, 128 + signal.SIGTERM, "Terminated", "terminated (SIGTERM)")
            _fail(ctx, errors.EXIT_INTERRUPTED, "KeyboardInterrupt", "interrupted")


_EXIT_CODES_HEADING = EXIT_CODES_HELP.split(":", 1)[0]

#: ``ctx.meta`` key of the root's raw arguments.
_ARGV = "nnpatch.argv"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup runs (temporary files, journals, locks)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _argv_has(ctx: click.Context, flag: str) -> bool:
    argv = ctx.find_root().meta.get(_ARGV, [])
    if "--" in argv:
        argv = argv[: argv.index("--")]
    return flag in argv


def _wants_json(ctx: click.Context) -> bool:
    return _argv_has(ctx, "--json")


def _fail(ctx: click.Context, code: int, kind: str, message: str) -> None:
    line = _one_line(message)
    try:
        click.echo(f"Error: {line}", err=True)
    except OSError:
        pass
    if _wants_json(ctx):
        _emit_error(code, kind, line)
    ctx.exit(code)


def _emit_error(code: int, kind: str, message: str) -> None:
    """The JSON error object (spec/json/error.schema.json) on stdout."""
    try:
        emit_json({"ok": False, "error": {"code": code, "kind": kind, "message": _one_line(message)}})
    except OSError:
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so that nothing more (nor the flush at exit) fails on a closed pipe."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def _set_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        set_flag(ctx, param.name)


def _adopt(cmd: click.Command) -> None:
    """Every command also takes ``--quiet`` and ``--debug`` after its name, and its help leaves
    the exit-code table to ``nnpatch --help``."""
    if cmd.epilog and cmd.epilog.startswith(_EXIT_CODES_HEADING):  # the table, or one built from it
        cmd.epilog = None
    taken = {o for p in cmd.params for o in getattr(p, "opts", [])} | {p.name for p in cmd.params}
    if "quiet" not in taken and "--quiet" not in taken:
        cmd.params.append(click.Option(["-q", "--quiet"] if "-q" not in taken else ["--quiet"], is_flag=True,
                                       expose_value=False, callback=_set_flag,
                                       help="No progress bars, no success line (same as nnpatch --quiet)."))
    if "debug" not in taken and "--debug" not in taken:
        cmd.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_flag,
                                       help="Show tracebacks for errors (same as nnpatch --debug)."))


def _one_line(message: str) -> str:
    # Messages may quote a patch or model (names, paths): no terminal escapes, no second line.
    # Backslashes stay single: they are the message's own far more often than a hostile name's.
    return printable(message, backslash=False)


def _load(name: str) -> click.Command | None:
    if name == "train-sparse":
        try:
            from .train_sparse import train_sparse
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
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no success line.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
def cli(debug: bool, quiet: bool) -> None:
    """Small, exact, verifiable patches for neural-network weights."""


def main() -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    cli(prog_name="nnpatch")


if __name__ == "__main__":  # pragma: no cover
    main()
