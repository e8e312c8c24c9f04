"""Byte progress bars on stderr (rich), for the commands that read or write whole models."""

from __future__ import annotations

import contextlib
import os

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ._common import quiet


@contextlib.contextmanager
def progress(ctx: click.Context, label: str, total: int, enabled: bool = True):
    """A byte progress bar on stderr, only when it is a terminal and wanted."""
    console = Console(stderr=True, highlight=False)
    if not enabled or quiet(ctx) or not console.is_terminal:
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


def model_size(path: str) -> int:
    """Bytes of a model file or directory (for progress bars); 0 when unreadable."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                   if os.path.isfile(os.path.join(d, f)))
    return os.path.getsize(path) if os.path.exists(path) else 0
