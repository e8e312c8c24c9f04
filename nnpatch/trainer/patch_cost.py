"""What a patch of a model costs, in bytes, by part: :class:`PatchCost` (``--budget``).

A patch is not the changed values alone.  Whatever changes, it carries the container (preamble,
trailer), the target's layout and the header's model digests; every changed tensor adds an op (its
name, two BLAKE3 digests, shape, sections: most of a small model's patch) and sections aligned to 64
bytes; and then the values.  :func:`nnpatch.trainer.probes.measure` reads those parts from the real
writer; this module holds the result, which the channel selection (:mod:`nnpatch.trainer.sparse`)
and the fit to the budget (:mod:`nnpatch.trainer.fit`) read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PatchCost"]


@dataclass
class PatchCost:
    """Estimated patch bytes of an update, per part (see the module docstring)."""

    #: bytes of the patch that changes no channel (container, layout, digests; free norm values)
    fixed: int
    #: per channel, in group order: the bytes its values add
    values: torch.Tensor
    #: per group: the bytes the first changed channel of the group adds beyond its values
    overhead: torch.Tensor
    #: per channel: its group's index
    group_of: torch.Tensor

    def estimate(self, channels: torch.Tensor) -> int:
        """Estimated bytes of the patch that changes ``channels`` (bool per channel)."""
        touched = torch.zeros(len(self.overhead), dtype=torch.bool)
        touched[self.group_of[channels]] = True
        return int(round(self.fixed + float(self.values[channels].sum()) + float(self.overhead[touched].sum())))

    def cheapest(self) -> int:
        """The smallest patch that changes one channel."""
        if not len(self.values):
            return self.fixed
        return int(round(self.fixed + float((self.values + self.overhead[self.group_of]).min())))

    def share_that_fits(self, budget_bytes: int) -> float:
        """The share of the channels' value bytes that ``budget_bytes`` holds once the fixed part and every
        tensor's overhead are paid (0 to 1): how much of the full update fits."""
        room = budget_bytes - self.fixed - float(self.overhead.sum())
        whole = float(self.values.sum())
        return 1.0 if whole <= 0 else min(1.0, max(0.0, room / whole))

    def total(self) -> int:
        """Estimated bytes of the patch that changes every channel."""
        return self.estimate(torch.ones(len(self.values), dtype=torch.bool))
