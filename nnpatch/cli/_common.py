"""What every command module shares; click and the standard library only, so
that a command as light as ``hash`` stays light."""

from __future__ import annotations

import json

import click

EXIT_CODES_HELP = """\b
Exit codes:
  0  ok
  1  verify ran and found a mismatch
  2  usage error
  3  invalid or corrupt input file (patch or model)
  4  wrong base, or an integrity check failed
  5  I/O error
  130 interrupted"""


def debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


def quiet(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("quiet"))


def emit_json(obj) -> None:
    # ensure_ascii (json's default) on purpose: names from a patch may hold lone surrogates, which
    # only an escape can carry, and the output then fits any stdout encoding.
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
