"""Checks on what a user passed, made before any work: a model and a patch given in the
wrong order, a private key where the public one is meant. Each says what to do instead."""

from __future__ import annotations

import os

from ..errors import NnpatchError, UsageError
from ..patchfile import MAGIC
from ..weights.sniff import sniff


def is_patch(path: str) -> bool:
    """Whether ``path`` is a file that starts with the patch magic."""
    if path == "-" or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_model(path: str) -> bool:
    """Whether ``path`` is a model nnpatch can read (by its content, as every command decides)."""
    if path == "-" or not os.path.exists(path):
        return False
    try:
        sniff(path)
    except NnpatchError:
        return False
    return True


def check_order(usage: str, *, models: dict[str, str], patches: dict[str, str]) -> None:
    """Refuse a patch given where a model goes, or a model where a patch goes (exit 2).

    ``models`` and ``patches`` map each argument's name (as in ``usage``) to its path."""
    for role, path in models.items():
        if path is not None and is_patch(path):
            raise UsageError(f"{path} is a patch, given as {role}; the order is: {usage}")
    for role, path in patches.items():
        if path is not None and not is_patch(path) and is_model(path):
            raise UsageError(f"{path} is a model, given as {role}; the order is: {usage}")


def check_public_key(path: str | None, option: str = "--key") -> None:
    """A private key given where the public one is meant is refused (exit 2): the patch would be
    checked just the same, but a private key has no business on the machine that applies."""
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # the key reader reports it
    if b"PRIVATE KEY-----" in head:
        raise UsageError(f"{path} is a private key; {option} takes the public key (`nnpatch keygen -o NAME` "
                         "writes it as NAME.pub.pem), and the private key stays with whoever signs")
