"""What a patch changes, per tensor, from its header alone: the rows of
``nnpatch show`` (a table with bars) and of ``nnpatch show --plot`` (a
picture, through matplotlib, an optional extra), and :func:`printable`, which
makes any text taken from a patch or a model safe to put on a terminal."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import MissingDependencyError, NnpatchIOError

if TYPE_CHECKING:
    # Only for annotations: the patchfile package pulls numpy and zstandard, and the CLI's error
    # handler imports this module for printable() on every run, even ``nnpatch --version``.
    from .patchfile import PatchHeader

NEEDS_MATPLOTLIB = "drawing a plot needs matplotlib: pip install 'nnpatch[plot]'"
#: Tensors drawn at most (the biggest by patch bytes), so that a large model stays legible.
MAX_PLOTTED = 40

_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_BAR_GLYPHS = "█▏▎▍▌▋▊▉"


def printable(text: str, *, backslash: bool = True, encoding: str | None = None) -> str:
    """``text`` with every character a terminal could act on, or that cannot be
    shown, replaced by a Python-style escape; for text from a patch or model.

    Escaped: every character for which :meth:`str.isprintable` is false, that
    is C0 controls (ESC is ``\\x1b``), DEL, C1 controls, lone surrogates
    (``\\udcff``), format characters such as bidi overrides (``\\u202e``) and
    zero-width spaces, line and paragraph separators (``\\u2028``), spaces
    other than U+0020 (``\\xa0``), private-use and unassigned code points.
    Tab, newline and carriage return become ``\\t``, ``\\n``, ``\\r``; others
    ``\\xNN`` below U+0100, ``\\uNNNN`` below U+10000, ``\\UNNNNNNNN`` above.

    ``backslash`` (the default) also doubles every backslash, so that the
    result is unambiguous: a name cannot pose as another by spelling out an
    escape.  ``encoding``, when given, also escapes what that codec cannot
    encode (``\\xe9`` for "é" on an ASCII terminal) instead of failing later.
    """
    if text.isascii() and text.isprintable() and not (backslash and "\\" in text):
        return text
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\" if backslash else c)
        elif c.isprintable() and (encoding is None or _encodable(c, encoding)):
            out.append(c)
        else:
            out.append(_escape(c))
    return "".join(out)


def _encodable(c: str, encoding: str) -> bool:
    try:
        c.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _escape(c: str) -> str:
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


@dataclass(frozen=True)
class TensorShare:
    name: str
    op: str
    #: fraction of the tensor's values the op rewrites (rows: rows changed / rows); None where the patch
    #: cannot tell (a ``whole`` op that carries the new values as they are, not relative to the old ones)
    share: float | None
    patch_bytes: int  # bytes its sections take in the patch


def tensor_shares(header: PatchHeader, changed: dict[str, int | None] | None = None) -> list[TensorShare]:
    """One row per op. ``changed`` gives, by tensor name, how many values a ``whole`` op really changes,
    which the header alone cannot say (``nnpatch show`` counts the non-zero deltas of one sent relative
    to the old values), or None where the patch cannot tell (new values sent as they are); a whole op
    it does not name counts as wholly changed."""
    out = []
    for op in header.ops:
        ref = op.target or op.base
        if op.kind in ("rows", "qrows"):
            share = op.count / max(1, ref.shape[0])
        elif op.kind == "elements":
            share = op.count / max(1, math.prod(ref.shape))
        elif changed is not None and op.name in changed:
            n = changed[op.name]
            share = None if n is None else n / max(1, math.prod(ref.shape))
        else:
            share = 1.0
        out.append(TensorShare(op.name, op.kind, share, sum(s.length for s in op.sections())))
    return out


def bar(fraction: float, width: int = 12, *, ascii: bool = False) -> str:
    """A text bar of ``width`` cells (eighth-cell resolution).

    ``ascii`` draws ``#`` cells (rounded to whole cells) instead of block
    characters, for an output encoding that has no block characters."""
    cells = max(0.0, min(1.0, fraction)) * width
    if ascii:
        return ("#" * round(cells)).ljust(width)
    full = int(cells)
    part = " ▏▎▍▌▋▊▉"[int((cells - full) * 8)] if full < width else ""
    return ("█" * full + part.strip()).ljust(width)


def bar_glyphs_encodable(encoding: str) -> bool:
    """Whether text in ``encoding`` can carry :func:`bar`'s block characters."""
    return all(_encodable(c, encoding) for c in _BAR_GLYPHS)


def plot(header: PatchHeader, path: str | os.PathLike[str], *, title: str = "",
         shares: list[TensorShare] | None = None) -> int:
    """Draw per-tensor changed share and patch bytes to ``path`` (PNG, SVG, PDF by suffix).

    Tensor names are drawn through :func:`printable` and as plain text:
    matplotlib would otherwise read ``$...$`` in a name as mathtext (and fail
    on a malformed one).  ``shares`` defaults to :func:`tensor_shares` of the
    header.  Returns the number of tensors drawn (the ``MAX_PLOTTED`` biggest
    by patch bytes); the figure's title says so when that is not all."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError(NEEDS_MATPLOTLIB) from e
    from .hashing import name_key  # here, not on top: every CLI run imports this module (printable)

    every = tensor_shares(header) if shares is None else shares
    rows = sorted(every, key=lambda r: (-r.patch_bytes, name_key(r.name)))[:MAX_PLOTTED]
    rows.sort(key=lambda r: name_key(r.name))
    # printable() doubles backslashes, so distinct names stay distinct categories on the axis
    names = [printable(r.name) for r in rows][::-1]
    # Tick labels are made when the figure is drawn, so the whole drawing runs without mathtext.
    with matplotlib.rc_context({"text.parse_math": False}):
        fig, (a, b) = plt.subplots(1, 2, sharey=True, figsize=(11, 1.2 + 0.28 * max(1, len(rows))))
        try:
            # a share the patch cannot tell (values sent whole) draws no bar rather than a made-up 100 %
            a.barh(names, [math.nan if r.share is None else 100 * r.share for r in rows][::-1], color="#3b7dd8")
            a.set_xlabel("values changed (%)")
            a.set_xlim(0, 100)
            kib = [r.patch_bytes / 1024 for r in rows][::-1]
            b.barh(names, kib, color="#d8843b")
            b.set_xlabel("patch bytes (KiB)")
            b.set_xlim(0, max(kib) * 1.05 if kib and max(kib) > 0 else 1)
            if not rows:  # no bars: say so, and keep both axes at zero and up
                a.set_yticks([])
                a.text(50, 0, "no tensor changed", ha="center", va="center")
            heading = f"{len(every)} tensors changed" if len(rows) == len(every) else \
                f"the {len(rows)} largest of {len(every)} changed tensors, by patch bytes"
            fig.suptitle(f"{printable(title, backslash=False)}: {heading}" if title else heading)
            fig.tight_layout()
            fig.savefig(os.fspath(path), dpi=120)
        except OSError as e:
            raise NnpatchIOError(f"{os.fspath(path)}: cannot write: {e.strerror or e}") from e
        finally:
            plt.close(fig)
    return len(rows)
