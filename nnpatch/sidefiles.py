"""The names of the files nnpatch keeps beside a model: the undo journal of an in-place update
(spec/JOURNAL.md). Standard library only, so that a command as light as ``hash`` can ask
whether a model is mid-way through an update without loading the applier."""

from __future__ import annotations

import os

#: The undo journal beside ``MODEL``: ``MODEL.nnpatch-journal`` (and ``.tmp`` while it is written).
JOURNAL_SUFFIX = ".nnpatch-journal"


def journal_path(model: str | os.PathLike[str]) -> str:
    return os.fspath(model) + JOURNAL_SUFFIX


def interrupted(model: str | os.PathLike[str]) -> bool:
    """Whether a committed undo journal lies beside ``model``: an in-place update of it was
    interrupted, and its bytes are neither the old version nor the new one until it is recovered."""
    return os.path.exists(journal_path(model))


__all__ = ["JOURNAL_SUFFIX", "interrupted", "journal_path"]
