"""What a patch changes, per tensor, from its header alone: the rows of
``nnpatch show`` (a table with bars) and of ``nnpatch show --plot`` (a
picture, through matplotlib, an optional extra)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import MissingDependencyError, NnpatchIOError
from .patchfile import PatchHeader

NEEDS_MATPLOTLIB = "drawing a plot needs matplotlib: pip install 'nnpatch[plot]'"
#: Tensors drawn at most (the biggest by patch bytes), so that a large model stays legible.
MAX_PLOTTED = 40


@dataclass(frozen=True)
class TensorShare:
    name: str
    op: str
    share: float  # fraction of the tensor's values the op rewrites (rows: rows changed / rows)
    patch_bytes: int  # bytes its sections take in the patch


def tensor_shares(header: PatchHeader) -> list[TensorShare]:
    out = []
    for op in header.ops:
        ref = op.target or op.base
        if op.kind == "rows":
            share = op.count / ref.shape[0]
        elif op.kind == "elements":
            share = op.count / max(1, math.prod(ref.shape))
        else:
            share = 1.0
        out.append(TensorShare(op.name, op.kind, share, sum(s.length for s in op.sections())))
    return out


def bar(fraction: float, width: int = 12) -> str:
    """A text bar of ``width`` cells (eighth-cell resolution)."""
    cells = max(0.0, min(1.0, fraction)) * width
    full = int(cells)
    part = " ▏▎▍▌▋▊▉"[int((cells - full) * 8)] if full < width else ""
    return ("█" * full + part.strip()).ljust(width)


def plot(header: PatchHeader, path: str | os.PathLike[str], *, title: str = "") -> int:
    """Draw per-tensor changed share and patch bytes to ``path`` (PNG, SVG, PDF by suffix).

    Returns the number of tensors drawn (the ``MAX_PLOTTED`` biggest by patch bytes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError(NEEDS_MATPLOTLIB) from e
    rows = sorted(tensor_shares(header), key=lambda r: -r.patch_bytes)[:MAX_PLOTTED]
    rows.sort(key=lambda r: r.name.encode("utf-8", "surrogatepass"))
    names = [r.name for r in rows][::-1]
    fig, (a, b) = plt.subplots(1, 2, sharey=True, figsize=(11, 1.2 + 0.28 * max(1, len(rows))))
    a.barh(names, [100 * r.share for r in rows][::-1], color="#3b7dd8")
    a.set_xlabel("values changed (%)")
    a.set_xlim(0, 100)
    b.barh(names, [r.patch_bytes / 1024 for r in rows][::-1], color="#d8843b")
    b.set_xlabel("patch bytes (KiB)")
    fig.suptitle(title or f"{len(header.ops)} tensors changed")
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(path), dpi=120)
    except OSError as e:
        raise NnpatchIOError(f"{os.fspath(path)}: cannot write: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return len(rows)
