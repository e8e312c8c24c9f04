"""SparseUpdate: keep the channels that moved most, freeze the rest at their base values.

Use around any training loop::

    su = SparseUpdate(model, base_state, ratio=0.1)          # before building the optimizer is fine
    for step in range(total):
        loss.backward()
        su.after_backward()            # zero gradients of frozen channels
        optimizer.step()
        su.after_step(optimizer)       # zero their optimizer state, reset them bit-exactly
        su.on_step(step + 1, total)    # prune when the schedule says so
    su.finalize()                      # every frozen channel == base, bit for bit
    su.verify()                        # raises if the kept share or the frozen bits are wrong

Schedule (:class:`PruneSchedule`, default ``cubic``): ``events`` prune events at
the steps ``round(total * end * i / events)``, ``i = 1..events``.  At event *i*
the kept share is ``r + (1 - r) * (1 - i / events) ** 3`` (``linear``: power 1)
of the channels, so it ramps from 100 % to the target ``r`` and reaches it at
``end`` (default 0.25) of training; the remaining 75 % of the steps fine-tune the
kept channels only (benchmarks/RESULTS-tinyupdater.md: ending the ramp early
leaves the kept channels time to re-adapt after their neighbours were reset).  ``oneshot`` prunes once at ``end``; ``start`` prunes once
before the first step (with ``selection="random"``: a random fixed subset).
Pruning is monotone: a frozen channel is never revived.

Selection: channels are ranked by the L1 distance between the current weights
and the base weights, summed over all tensors of the channel (``selection="l1"``,
the Tiny Updater rule as published), by that distance divided by the channel's parameter
count (``"l1_mean"``), by that distance divided by the mean distance of the live
channels of its layer (``"l1_layer"``: layers compete on relative change, so the
kept channels spread over the depth instead of piling up in the widest layers),
or by a seeded random score (``"random"``).  Of the L1 rules ``"l1_layer"`` is the better: with the
plain global sum the widest layer (largest fan-in) takes nearly all kept channels,
which measured 2-3 points worse on the digits domain shift.  ``"teacher"`` / ``"teacher_layer"``
rank by the teacher's (the full update's) distance to the base instead of the
student's -- with ``schedule="start"`` the student then trains only those channels
from the first step, and nothing it learnt is ever reset.  ``"fisher"`` / ``"fisher_layer"``
rank by the Fisher-weighted squared movement ``sum(F * (w - w0) ** 2)`` over the channel's
parameters, ``F`` being the optimizer's running mean of squared gradients (Adam's
``exp_avg_sq``; an own moving average with other optimizers): second-order, the loss a
channel's reset to the base would cost, where L1 counts movement along flat directions
too.  ``"fisher"`` (global, no per-layer normalisation) is :class:`SparseUpdate`'s default.
Measured on the mnist5k scenarios (width 16, k = 10 %, 3 seeds; benchmarks/RESULTS-tinyupdater.md,
"Closing the gap"): Fisher ranking per layer beat ``l1_layer`` on every seed of the domain shift, by 2.1
points, and the global Fisher ranking then gained another 1.2 points there (-0.2 on "more data", noise)
with patches of less than half the bytes: unlike the global L1 sum, it does not pile the kept channels
into the widest layers, but puts them where the loss is most sensitive -- the first layers and the
classifier after an input shift, whose channels have few parameters.  With ``ratio`` the top
``floor(share * N)`` channels are kept (N = channel count); with ``budget_bytes``
channels are taken in rank order while their estimated size fits the byte target of
the event.  With ``cost`` (:func:`nnpatch.trainer.patch_cost.measure`, what
``train-sparse --budget`` passes) the estimate is the writer's: the patch's fixed part,
each touched tensor's op (paid by the first channel of a group that changes) and each
channel's values; without it, raw bytes times ``cost_factor`` plus the raw bytes of the
norm values that change in every channel under ``norm_stats`` adapt or affine.

Frozen BatchNorm channels behave as on the device: in training mode their output
uses the stored running statistics (eval-mode normalization), and their running
statistics are restored after every forward, so they are not updated.

``norm_stats="adapt"`` (opt-in) lets every BatchNorm channel's running statistics
follow the new data, as in ordinary training, while frozen channels keep their
weights, affine parameters included: after a shift of the input distribution
(noise, a new camera) the stored statistics of frozen channels are stale, and
the whole update is crippled by them.  The statistics are 2 numbers per channel,
so the patch grows by a few hundred bytes per norm layer; a channel counts as
changed only when its parameters do (``changed_channels(..., ignore=...)``), and
:meth:`SparseUpdate.verify` reports the statistics apart, as ``stats_changed``
(``norm_stats_changed`` in the ``train-sparse`` report).

``norm_stats="affine"`` (opt-in) also trains every norm channel's scale and shift
(the norm layer's ``weight`` and ``bias``: 2 more numbers per channel), so a
frozen channel keeps its producer's weights but is re-scaled and re-centred for
the new data.  These values are counted like the statistics: not as changed
channels, and apart in ``stats_changed``.  It is the largest single gain measured
after an input shift (mnist5k, width 16, k = 10 %: +3.4 points over ``adapt``),
at about 1 KB of patch for that model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError, UsageError
from .channels import ChannelGroup, group_channels, unwrap_model
from .patch_cost import PatchCost

__all__ = ["PruneSchedule", "SparseUpdate", "changed_channels", "NORM_STATS", "SELECTIONS"]

SELECTIONS = ("l1", "l1_mean", "l1_layer", "random", "teacher", "teacher_layer", "fisher", "fisher_layer")
NORM_STATS = ("frozen", "adapt", "affine")


@dataclass
class PruneSchedule:
    kind: str = "cubic"   # cubic | linear | oneshot | start
    end: float = 0.25     # fraction of training at which the target is reached
    events: int = 10      # number of prune events for cubic/linear

    def __post_init__(self) -> None:
        if self.kind not in ("cubic", "linear", "oneshot", "start"):
            raise ValueError(f"unknown prune schedule {self.kind!r}")
        if not 0.0 <= self.end <= 1.0:
            raise ValueError("schedule end must be in [0, 1]")
        if self.events < 1:
            raise ValueError("schedule events must be >= 1")

    def plan(self, total_steps: int) -> list[tuple[int, float]]:
        """(step, progress) pairs; progress 1.0 means 'reach the target'.

        Pruning happens after the optimizer step numbered ``step`` (1-based);
        ``step == 0`` means before training."""
        if self.kind == "start":
            return [(0, 1.0)]
        last = max(1, min(total_steps, round(total_steps * self.end)))
        if self.kind == "oneshot":
            return [(last, 1.0)]
        n = max(1, min(self.events, last))
        plan: dict[int, float] = {}
        for i in range(1, n + 1):
            s = max(1, round(last * i / n))
            frac = i / n
            plan[s] = max(plan.get(s, 0.0), frac)
        return sorted(plan.items())

    def share(self, progress: float, target: float) -> float:
        """Kept share at a given progress in (0, 1]."""
        if self.kind in ("oneshot", "start") or progress >= 1.0:
            return target
        power = 3 if self.kind == "cubic" else 1
        return target + (1.0 - target) * (1.0 - progress) ** power


def _index(mask_slice: torch.Tensor) -> torch.Tensor:
    return (~mask_slice).nonzero().flatten()


class SparseUpdate:
    """Channel-sparse update of ``model`` relative to ``base_state``.

    ``base_state``: state dict of the pre-update model M0 (defaults to a copy of
    the model's current state).  Exactly one of ``ratio`` (share of channels,
    0 < ratio <= 1) and ``budget_bytes`` selects the target.
    """

    def __init__(self, model: nn.Module, base_state: dict[str, torch.Tensor] | None = None,
                 ratio: float | None = 0.1, schedule: PruneSchedule | str | None = None, *,
                 budget_bytes: int | None = None, cost_factor: float = 1.0,
                 selection: str = "fisher", seed: int = 0,
                 groups: list[ChannelGroup] | None = None,
                 reference_state: dict[str, torch.Tensor] | None = None, norm_stats: str = "frozen",
                 cost: PatchCost | None = None) -> None:
        self.model = unwrap_model(model)
        if budget_bytes is not None:
            ratio = None
        if ratio is None and budget_bytes is None:
            raise ValueError("give ratio or budget_bytes")
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}")
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {norm_stats!r}")
        self.norm_stats = norm_stats
        if selection.startswith("teacher") and reference_state is None:
            raise ValueError(f"selection {selection!r} needs reference_state (the teacher's weights)")
        self.reference_state = reference_state
        self.ratio = ratio
        self.budget_bytes = budget_bytes
        self.cost_factor = float(cost_factor)
        self.selection = selection
        self.seed = seed
        if schedule is None:
            schedule = PruneSchedule()
        elif isinstance(schedule, str):
            schedule = PruneSchedule(kind=schedule)
        self.schedule = schedule
        self.groups = groups if groups is not None else group_channels(self.model)
        live = self.model.state_dict(keep_vars=True)
        if base_state is None:
            base_state = {k: v.detach().clone() for k, v in live.items()}
        self.tensors: dict[str, torch.Tensor] = {}
        self.base: dict[str, torch.Tensor] = {}
        for g in self.groups:
            for m in g.members:
                t = live[m.key]
                if m.key not in base_state:
                    raise KeyError(f"base state has no tensor {m.key!r}")
                b = base_state[m.key]
                if tuple(b.shape) != tuple(t.shape):
                    raise ValueError(f"tensor {m.key!r}: base shape {tuple(b.shape)} != model {tuple(t.shape)}")
                self.tensors[m.key] = t
                self.base[m.key] = b.detach().to(device=t.device, dtype=t.dtype).clone()
        self.extra_base = {k: base_state[k].detach().clone() for k, t in live.items()
                           if k not in self.tensors and k in base_state}
        self.masks: dict[str, torch.Tensor] = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self._cpu_state = {k: v.detach() for k, v in self.base.items()}
        # bytes in the base's own dtypes (what a patch stores), parameters as counted in the model
        self.channel_bytes = torch.cat([g.bytes_per_channel(base_state) for g in self.groups]) \
            if self.groups else torch.zeros(0, dtype=torch.int64)
        self.channel_params = torch.cat([g.params_per_channel(self._cpu_state) for g in self.groups]) \
            if self.groups else torch.zeros(0, dtype=torch.int64)
        self.events_done = 0
        self._plan: list[tuple[int, float]] | None = None
        self._plan_total: int | None = None
        self._frozen_idx: dict[tuple[str, int], torch.Tensor] = {}
        self._hooks: list = []
        self._stats_dirty = False
        #: own moving average of squared gradients, for "fisher*" under an optimizer without exp_avg_sq
        self._grad_sq: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self._norm_groups = [g for g in self.groups if g.norm is not None]
        #: norm-layer tensors that may change in every channel: the running statistics under
        #: norm_stats="adapt", and the scale and shift too under "affine"
        self.free_stats: set[str] = free_norm_keys(self.groups, norm_stats, self.tensors)
        #: raw bytes of those tensors: in the patch whatever the selection, so a byte budget is spent on
        #: them first (at their raw size: they are never quantized) and no channel's cost counts them
        self.free_bytes = free_norm_bytes(self.free_stats, base_state)
        if self.free_stats:
            self.channel_bytes = torch.cat([g.bytes_per_channel(base_state, self.free_stats) for g in self.groups])
        #: the patch's bytes as the writer makes them (patch_cost.measure); None: raw bytes x cost_factor
        self.cost = cost
        if cost is not None and len(cost.values) != self.num_channels:
            raise ValueError(f"cost has {len(cost.values)} channels, the model {self.num_channels}")
        if budget_bytes is not None:
            check_budget(budget_bytes, self.free_bytes, norm_stats, cost)
        if norm_stats == "frozen":
            self._install_norm_hooks()
        self._refresh()

    # ----------------------------------------------------------------- basics
    @property
    def num_channels(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def num_kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def mask_vector(self) -> torch.Tensor:
        return torch.cat([self.masks[g.name] for g in self.groups]) if self.groups else torch.zeros(0, dtype=torch.bool)

    def set_mask_vector(self, vec: torch.Tensor) -> None:
        """Adopt ``vec`` (bool per channel, in :meth:`mask_vector`'s order) as the masks.  Newly
        frozen channels keep their current values until :meth:`reset_frozen`."""
        off = 0
        for g in self.groups:
            self.masks[g.name] = vec[off:off + g.size].clone()
            off += g.size
        self._refresh()

    def _refresh(self) -> None:
        self._frozen_idx.clear()
        for g in self.groups:
            mask = self.masks[g.name]
            for i, m in enumerate(g.members):
                idx = _index(mask[m.start:m.stop])
                if idx.numel():
                    self._frozen_idx[(g.name, i)] = idx.to(self.tensors[m.key].device)

    def _frozen(self):
        for g in self.groups:
            for i, m in enumerate(g.members):
                idx = self._frozen_idx.get((g.name, i))
                if idx is not None and m.key not in self.free_stats:
                    yield m, idx

    # ------------------------------------------------------------ the hooks
    @torch.no_grad()
    def after_backward(self) -> None:
        """Zero the gradients of frozen channels (call after backward, before clipping/stepping).

        Also restores the running statistics of frozen BatchNorm channels, which the
        training-mode forward updated (it cannot be undone before backward: autograd
        holds those tensors)."""
        if self._stats_dirty:
            self.reset_frozen()
        if self.selection.startswith("fisher") and not self._adam_like():
            self._track_grad_sq()
        for m, idx in self._frozen():
            t = self.tensors[m.key]
            if t.grad is None:
                continue
            if m.axis is None:
                t.grad.zero_()
            else:
                t.grad.index_fill_(m.axis, idx, 0)

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            return
        for m, idx in self._frozen():
            t = self.tensors[m.key]
            state = optimizer.state.get(t)
            if not state:
                continue
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == t.shape and v.dim() > 0:
                    if m.axis is None:
                        v.zero_()
                    else:
                        v.index_fill_(m.axis, idx, 0)

    @torch.no_grad()
    def reset_frozen(self) -> None:
        """Copy the base values back into every frozen channel (bit-exact)."""
        self._stats_dirty = False
        for m, idx in self._frozen():
            t = self.tensors[m.key]
            b = self.base[m.key]
            if m.axis is None:
                t.copy_(b)
            else:
                t.index_copy_(m.axis, idx, b.index_select(m.axis, idx))

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero frozen optimizer state and reset frozen channels (weight decay moves them)."""
        self.mask_optimizer_state(optimizer)
        self.reset_frozen()

    # ---------------------------------------------------------------- scores
    @torch.no_grad()
    def scores(self, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """L1 distance to the base of every channel (float64, concatenated over groups), of the
        model's current weights or of ``state`` (e.g. a teacher's)."""
        src = self.tensors if state is None else state

        def l1(key: str) -> torch.Tensor:
            cur = src[key].detach().to(device=self.base[key].device, dtype=torch.float64)
            return (cur - self.base[key].to(torch.float64)).abs()
        return self._per_channel(l1)

    def _per_channel(self, term) -> torch.Tensor:
        """``term(key)`` (a float64 tensor shaped like that member, or None: nothing) summed per channel,
        over every member of every group but the tensors free in every channel (their movement is no
        signal for the ranking); float64, concatenated over groups."""
        out = []
        for g in self.groups:
            s = torch.zeros(g.size, dtype=torch.float64)
            for m in g.members:
                d = term(m.key) if m.key not in self.free_stats else None
                if d is None:
                    continue
                if m.axis is None:
                    s += d.sum().cpu()
                else:
                    dims = [i for i in range(d.dim()) if i != m.axis]
                    s[m.start:m.stop] += (d.sum(dim=dims) if dims else d).cpu()
            out.append(s)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def _adam_like(self) -> bool:
        opt = self.optimizer
        return opt is not None and isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))

    def _track_grad_sq(self) -> None:
        if self._plan is not None and self.events_done >= len(self._plan):
            return  # no prune event left: nothing will read it
        for key, t in self.tensors.items():
            if t.grad is None:
                continue
            g2 = t.grad.detach() ** 2
            if key in self._grad_sq:
                self._grad_sq[key].mul_(0.9).add_(g2, alpha=0.1)
            else:
                self._grad_sq[key] = g2

    def _second_moment(self, key: str) -> torch.Tensor | None:
        t = self.tensors[key]
        if self._adam_like():
            state = self.optimizer.state.get(t)  # type: ignore[union-attr]
            v = state.get("exp_avg_sq") if state else None
            return v if isinstance(v, torch.Tensor) and v.shape == t.shape else None
        return self._grad_sq.get(key)

    @torch.no_grad()
    def fisher_scores(self) -> torch.Tensor:
        """``sum(F * (w - w0) ** 2)`` per channel (float64, concatenated over groups), ``F`` the running
        mean of squared gradients (the optimizer's ``exp_avg_sq``, else an own moving average).
        Tensors without gradients (running statistics) add nothing."""
        def fisher(key: str) -> torch.Tensor | None:
            f = self._second_moment(key)
            if f is None:  # no gradient (running statistics)
                return None
            return f.to(torch.float64) * (self.tensors[key].detach().to(torch.float64)
                                          - self.base[key].to(torch.float64)) ** 2
        return self._per_channel(fisher)

    def _layer_normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """Each channel's score divided by the mean score of the live channels of its group."""
        out = scores.clone()
        alive = self.mask_vector()
        off = 0
        for g in self.groups:
            sl = slice(off, off + g.size)
            live = scores[sl][alive[sl]]
            mean = float(live.mean()) if live.numel() else 0.0
            if mean > 0:
                out[sl] = scores[sl] / mean
            off += g.size
        return out

    def _random_scores(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_007 * self.seed + 17)
        return torch.rand(self.num_channels, generator=gen, dtype=torch.float64)

    # --------------------------------------------------------------- pruning
    def _select(self, scores: torch.Tensor, *, keep: int | None = None, budget: float | None = None) -> torch.Tensor:
        alive = self.mask_vector()
        s = scores.clone().to(torch.float64)
        s[~alive] = -math.inf
        order = torch.sort(s, descending=True, stable=True).indices
        new = torch.zeros_like(alive)
        if keep is not None:
            keep = min(keep, int(alive.sum()))
            new[order[:keep]] = True
        else:
            assert budget is not None
            cost, overhead, group_of = self._costs()
            touched = torch.zeros(len(overhead), dtype=torch.bool)
            used = 0.0
            for i in order.tolist():
                if not alive[i]:
                    break
                g = int(group_of[i])
                c = float(cost[i]) + (0.0 if touched[g] else float(overhead[g]))
                if used + c <= budget:
                    new[i] = True
                    touched[g] = True
                    used += c
        return new & alive

    def importance(self) -> torch.Tensor:
        """Every channel's score under ``selection`` (float64, in :meth:`mask_vector`'s order): what
        :meth:`prune` ranks by, the higher the more worth keeping."""
        if self.selection == "random":
            scores = self._random_scores()
        elif self.selection.startswith("teacher"):
            scores = self.scores(self.reference_state)
        elif self.selection.startswith("fisher"):
            scores = self.fisher_scores()
        else:
            scores = self.scores()
        if self.selection == "l1_mean":
            scores = scores / self.channel_params.clamp(min=1).to(torch.float64)
        elif self.selection in ("l1_layer", "teacher_layer", "fisher_layer"):
            scores = self._layer_normalized(scores)
        return scores

    def _costs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bytes per channel, bytes the first changed channel of each group adds, group of each channel)."""
        if self.cost is not None:
            return self.cost.values, self.cost.overhead, self.cost.group_of
        sizes = torch.tensor([g.size for g in self.groups], dtype=torch.int64)
        group_of = torch.repeat_interleave(torch.arange(len(self.groups)), sizes) if self.groups \
            else torch.zeros(0, dtype=torch.int64)
        return (self.channel_bytes.to(torch.float64) * self.cost_factor,
                torch.zeros(len(self.groups), dtype=torch.float64), group_of)

    def prune(self, k: int | None = None, *, share: float | None = None, budget: float | None = None,
              scores: torch.Tensor | None = None) -> int:
        """Keep the ``k`` best-scoring live channels (or a share, or what fits ``budget`` bytes),
        freeze and reset the rest.  Returns the number kept."""
        if scores is None:
            scores = self.importance()
        scores = _broadcast_from_rank0(scores)
        if k is None and budget is None:
            if share is None:
                share = self.ratio if self.ratio is not None else 1.0
            k = int(math.floor(share * self.num_channels + 1e-9))
        self.set_mask_vector(self._select(scores, keep=k, budget=budget))
        self.reset_frozen()
        self._zero_frozen_grads_and_state()
        return self.num_kept

    def _zero_frozen_grads_and_state(self) -> None:
        self.after_backward()
        self.mask_optimizer_state(getattr(self, "optimizer", None))

    def target_for(self, progress: float) -> dict:
        """Arguments of :meth:`prune` for a schedule progress in (0, 1]."""
        if self.budget_bytes is not None:
            total = self._estimate(torch.ones(self.num_channels, dtype=torch.bool))
            budget = self.channel_budget
            frac = self.schedule.share(progress, 0.0)  # 1 -> 0 ramp
            return {"budget": budget + (total - budget) * frac if progress < 1.0 else budget}
        share = self.schedule.share(progress, float(self.ratio))
        return {"k": int(math.floor(share * self.num_channels + 1e-9))}

    def plan(self, total_steps: int) -> list[tuple[int, float]]:
        if self._plan is None or self._plan_total != total_steps:
            self._plan = self.schedule.plan(total_steps)
            self._plan_total = total_steps
        return self._plan

    def on_step(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Run due prune events (``step`` = optimizer steps done so far). Returns True if it pruned."""
        if optimizer is not None:
            self.optimizer = optimizer
        plan = self.plan(total_steps)
        pruned = False
        while self.events_done < len(plan) and plan[self.events_done][0] <= step:
            self.prune(**self.target_for(plan[self.events_done][1]))
            self.events_done += 1
            pruned = True
        return pruned

    # ---------------------------------------------------------- BatchNorm
    def _install_norm_hooks(self) -> None:
        for g in self._norm_groups:
            norm = self.model.get_submodule(g.norm)
            self._hooks.append(norm.register_forward_pre_hook(self._make_pre_hook(g)))
            self._hooks.append(norm.register_forward_hook(self._make_post_hook(g)))

    def _make_pre_hook(self, g: ChannelGroup):
        def pre(module, inputs):
            module._nnpatch_frozen = None
            if module.training and module.running_mean is not None:
                idx = _index(self.masks[g.name])
                if idx.numel():
                    module._nnpatch_frozen = idx.to(module.running_mean.device)
        return pre

    def _make_post_hook(self, g: ChannelGroup):
        rm_key = f"{g.norm}.running_mean"
        rv_key = f"{g.norm}.running_var"

        def post(module, inputs, output):
            idx = getattr(module, "_nnpatch_frozen", None)
            if idx is None:
                return None
            module._nnpatch_frozen = None
            # The running stats of frozen channels were just updated by the forward; autograd
            # saved them, so they are restored in after_backward()/after_step(), not here.
            self._stats_dirty = True
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                return None
            rm = self.base[rm_key].index_select(0, idx)
            rv = self.base[rv_key].index_select(0, idx)
            x = inputs[0]
            w = module.weight.index_select(0, idx) if module.weight is not None else None
            b = module.bias.index_select(0, idx) if module.bias is not None else None
            frozen_out = F.batch_norm(x.index_select(1, idx), rm, rv, w, b, False, 0.0, module.eps)
            return output.index_copy(1, idx, frozen_out)
        return post

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------ finishing
    @torch.no_grad()
    def finalize(self) -> None:
        """Reset frozen channels and every tensor outside the groups (e.g. ``num_batches_tracked``)."""
        self.reset_frozen()
        live = self.model.state_dict(keep_vars=True)
        for k, b in self.extra_base.items():
            t = live[k]
            if t.shape == b.shape:
                t.copy_(b.to(device=t.device, dtype=t.dtype))

    def state_dict(self) -> dict:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}, "events_done": self.events_done}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["masks"].items():
            if k not in self.masks or self.masks[k].shape != v.shape:
                raise ValueError(f"checkpoint mask {k!r} does not fit this model")
            self.masks[k] = v.to(torch.bool).clone()
        self.events_done = int(state.get("events_done", 0))
        self._refresh()

    @property
    def fixed_bytes(self) -> float:
        """Estimated patch bytes that no channel's choice changes: with ``cost``, the patch's fixed part
        (container, layout, digests, free norm values); else the free norm values' raw bytes."""
        return float(self.cost.fixed) if self.cost is not None else float(self.free_bytes)

    @property
    def channel_budget(self) -> float:
        """What ``budget_bytes`` leaves for the kept channels, after :attr:`fixed_bytes`."""
        assert self.budget_bytes is not None
        return float(self.budget_bytes) - self.fixed_bytes

    def _estimate(self, channels: torch.Tensor) -> float:
        """Estimated bytes of the channels' part of the patch (values and, with ``cost``, overheads)."""
        cost, overhead, group_of = self._costs()
        touched = torch.zeros(len(overhead), dtype=torch.bool)
        touched[group_of[channels]] = True
        return float(cost[channels].sum()) + float(overhead[touched].sum())

    def estimated_bytes(self, channels: torch.Tensor) -> int:
        """Estimated patch bytes of the update that changes ``channels`` (bool per channel): with ``cost``,
        the writer's measured bytes (:meth:`PatchCost.estimate`); else their raw bytes times
        ``cost_factor``, plus the norm values free in every channel."""
        return int(round(self._estimate(channels) + self.fixed_bytes))

    def report(self) -> dict:
        """Channel and parameter counts of the current mask."""
        mask = self.mask_vector()
        return {
            "channels_total": self.num_channels,
            "channels_kept": int(mask.sum()),
            "params_total": int(self.channel_params.sum()),
            "params_kept": int(self.channel_params[mask].sum()),
            "bytes_kept_estimate": self.estimated_bytes(mask),
        }

    def verify(self, base_state: dict[str, torch.Tensor] | None = None) -> dict:
        """Check the model against the base: only kept channels may differ, and the changed
        share must meet the target (else :class:`~nnpatch.errors.TrainingError`).  Returns
        :func:`changed_channels`' report."""
        rep = changed_channels(self.model, base_state if base_state is not None else self.base, self.groups,
                               ignore=self.free_stats)
        mask = self.mask_vector()
        changed = rep.pop("changed_vector")
        if bool((changed & ~mask).any()):
            bad = [self._channel_name(int(i)) for i in (changed & ~mask).nonzero().flatten()[:3]]
            raise TrainingError(f"frozen channels differ from the base: {', '.join(bad)}")
        if self.ratio is not None and rep["channels_changed"] > math.floor(self.ratio * self.num_channels + 1e-9):
            raise TrainingError(f"{rep['channels_changed']} channels changed, more than "
                                 f"{self.ratio:.2%} of {self.num_channels}")
        if self.budget_bytes is not None:
            est = self._estimate(changed)
            if est > self.channel_budget + 1e-6:
                raise TrainingError(f"estimated update size {est + self.fixed_bytes:.0f} B exceeds budget "
                                    f"{self.budget_bytes} B")
        return rep

    def _channel_name(self, i: int) -> str:
        off = 0
        for g in self.groups:
            if i < off + g.size:
                return f"{g.name}[{i - off}]"
            off += g.size
        return str(i)


def free_norm_keys(groups: list[ChannelGroup], norm_stats: str, keys) -> set[str]:
    """The norm-layer tensors (among ``keys``) that may change in every channel: the running statistics
    under ``norm_stats="adapt"``, and the scale and shift too under ``"affine"``."""
    free = {"frozen": (), "adapt": ("running_mean", "running_var"),
            "affine": ("running_mean", "running_var", "weight", "bias")}[norm_stats]
    return {f"{g.norm}.{s}" for g in groups if g.norm is not None for s in free if f"{g.norm}.{s}" in keys}


def free_norm_bytes(free: set[str], base_state: dict[str, torch.Tensor]) -> int:
    return sum(base_state[k].numel() * base_state[k].element_size() for k in free)


def check_budget(budget_bytes: int, free_bytes: int, norm_stats: str, cost: PatchCost | None = None) -> None:
    """Refuse a byte budget that the norm values free in every channel use up on their own, or (with
    ``cost``) one below the smallest patch that changes a channel."""
    if cost is not None and cost.cheapest() > budget_bytes:
        norms = f", the norm values of --norm-stats {norm_stats}" if norm_stats != "frozen" else ""
        raise UsageError(f"a budget of {budget_bytes:,} bytes is below the smallest patch of this model that changes "
                         f"a channel, about {cost.cheapest():,} bytes (its fixed part: header, layout, "
                         f"digests{norms}: {cost.fixed:,} bytes); give a larger budget")
    if free_bytes >= budget_bytes:
        raise UsageError(f"a budget of {budget_bytes:,} bytes leaves nothing for channels: with --norm-stats "
                         f"{norm_stats} the norm values of every channel take {free_bytes:,} bytes of it; give a "
                         f"larger budget or --norm-stats frozen")


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Under torch.distributed, every rank takes rank 0's tensor (so all ranks select alike)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return t
    t = t.clone()
    dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def changed_channels(model: nn.Module | dict[str, torch.Tensor], base_state: dict[str, torch.Tensor],
                     groups: list[ChannelGroup] | None = None, ignore: set[str] | frozenset[str] = frozenset()) -> dict:
    """Compare raw bytes, channel by channel, between ``model`` (or a state dict) and ``base_state``.

    Tensors named in ``ignore`` (the norm tensors free in every channel: running statistics under
    ``norm_stats="adapt"``, and scale and shift too under ``"affine"``) do not make a channel count as
    changed; ``stats_changed`` counts their changed values.
    Returns counts of changed channels/parameters and ``changed_vector`` (bool per channel)."""
    if isinstance(model, nn.Module):
        if groups is None:
            groups = group_channels(model)
        state = {k: v.detach() for k, v in unwrap_model(model).state_dict().items()}
    else:
        state = model
        if groups is None:
            raise ValueError("groups are needed when comparing state dicts")
    vec = []
    params_changed = 0
    params_total = 0
    stats_changed = 0
    for g in groups:
        ch = torch.zeros(g.size, dtype=torch.bool)
        for m in g.members:
            a = state[m.key].detach().cpu().contiguous()
            b = base_state[m.key].detach().cpu().to(a.dtype).contiguous()
            ne = _bytes_differ(a, b)
            if m.key in ignore:
                stats_changed += int(ne.sum())
                continue
            if m.axis is None:
                ch |= bool(ne.any())
            else:
                dims = [i for i in range(ne.dim()) if i != m.axis]
                ch[m.start:m.stop] |= ne.any(dim=dims) if dims else ne
        ppc = g.params_per_channel(state)
        params_total += int(ppc.sum())
        params_changed += int(ppc[ch].sum())
        vec.append(ch)
    changed = torch.cat(vec) if vec else torch.zeros(0, dtype=torch.bool)
    return {
        "channels_total": int(changed.numel()),
        "channels_changed": int(changed.sum()),
        "params_total": params_total,
        "params_changed": params_changed,
        "stats_changed": stats_changed,
        "changed_vector": changed,
    }


def _bytes_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise 'raw bytes differ' (so -0.0 vs 0.0 and NaN payloads count)."""
    if a.dtype.is_floating_point or a.dtype.is_complex:
        size = a.element_size()
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
        return a.view(view) != b.view(view)
    return a != b
