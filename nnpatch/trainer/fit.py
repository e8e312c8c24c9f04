"""Bring a trained update within ``--budget`` when its written patch came out larger than estimated.

The estimate (:mod:`nnpatch.trainer.patch_cost`) prices values by probes, and trained values compress
a little better or worse than the probes did.  When the written patch is over the budget, the least
important changed channels (by the selection rule that kept them, :meth:`SparseUpdate.importance`)
are reset to the base, as many as the estimate says free the excess, and the patch is written again;
this repeats until it fits.  The channels are reset exactly: their elements take the base's bits, and
in a quantized delta their codes become 0 (the ``qrows`` arithmetic keeps the old value where the code
is 0), so the patch still rebuilds the output bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quantdelta import QuantDelta
from .channels import ChannelGroup
from .patch_cost import PatchCost

__all__ = ["channels_to_drop", "reset_channels"]


def channels_to_drop(changed: torch.Tensor, importance: torch.Tensor, cost: PatchCost, excess: int) -> torch.Tensor:
    """The least important of the ``changed`` channels whose reset the estimate says saves ``excess``
    bytes: at least one, and never the last (bool per channel).  Needs two or more changed channels."""
    order = sorted((int(i) for i in changed.nonzero().flatten()), key=lambda i: (float(importance[i]), i))
    drop = torch.zeros_like(changed)
    now = cost.estimate(changed)
    for i in order[:-1]:
        drop[i] = True
        if now - cost.estimate(changed & ~drop) >= excess:
            break
    return drop


@torch.no_grad()
def reset_channels(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], groups: list[ChannelGroup],
                   drop: torch.Tensor, free: set[str], deltas: dict[str, QuantDelta] | None) -> None:
    """Reset the channels in ``drop`` (bool per channel) of ``state`` to ``base`` in place, and zero their
    codes in ``deltas`` (rows left with no code go; a tensor left with no row goes)."""
    off = 0
    for g in groups:
        idx = drop[off:off + g.size].nonzero().flatten()
        off += g.size
        if not idx.numel():
            continue
        for m in g.members:
            if m.key in free:
                continue
            t, b = state[m.key], base[m.key].to(state[m.key].dtype)
            reset = torch.zeros(t.shape, dtype=torch.bool)
            if m.axis is None:
                reset[...] = True
            else:
                local = idx[(idx >= m.start) & (idx < m.stop)] - m.start
                if not local.numel():
                    continue
                reset.index_fill_(m.axis, local, True)
            state[m.key] = torch.where(reset, b, t)
            if deltas is not None and m.key in deltas:
                _zero_codes(deltas, m.key, reset)


def _zero_codes(deltas: dict[str, QuantDelta], key: str, reset: torch.Tensor) -> None:
    qd = deltas[key]
    rows = qd.rows.astype(np.intp)
    mask = reset.reshape(reset.shape[0], -1).numpy()[rows]
    codes = np.where(mask, 0, qd.codes).astype(np.int8)
    kept = codes.any(axis=1)
    if not kept.any():
        del deltas[key]
        return
    scales = qd.scales[kept] if len(qd.scales) == len(rows) else qd.scales
    deltas[key] = QuantDelta(qd.rows[kept], scales, codes[kept], qd.bits)
