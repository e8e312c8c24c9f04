"""``train-sparse --delta-bits 8|4``: quantization-aware deltas for the channels the update keeps.

After the Tiny Updater (``tiny_updater.update``) the changed weights differ from M0 in a few channels.
This module makes their deltas exactly representable by the ``qrows`` op (format 1.3,
spec/FORMAT.md 7.5: ``new = old + scale * code``, a binary32 scale per row, 8- or 4-bit codes):

1. :func:`finetune`: a short quantization-aware phase. Every forward sees the weights
   ``base + scale * code`` (the scale of a row is its largest |delta| over ``2^(bits-1) - 1``,
   codes rounded to nearest); the gradient of those weights is applied to the full-precision
   ("latent") weights, a straight-through estimator, by swapping the latent weights back in
   before each optimizer step. Only the elements the sparse update changed may move; the rest
   are reset to M0 after every step, so the channel rule still holds. Normalization layers run in
   evaluation mode: their running statistics stay as the sparse update left them and are the ones
   the forward pass normalizes with, as after training.
2. :func:`exact_update`: the final weights computed by the spec's arithmetic
   (:mod:`nnpatch.quantdelta`, numpy, bit-exact), not by torch, from the base file's bits; and the
   :class:`~nnpatch.quantdelta.QuantDelta` of each tensor, for ``nnpatch.diff(quantized=...)``.
   The model written is therefore exactly the model the patch rebuilds.

Only tensors of rank 2 or more (weights: a row is an output channel of several elements) are
quantized, with a scale per row. Rank-1 tensors (biases, norm weights) keep their trained values
and the ordinary ops: a row of one element would cost a 4-byte scale and another 64-byte-aligned
section for a saving of at most 3 bytes a value.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import dtypes, quantdelta
from ..quantdelta import QuantDelta
from .trainer import Trainer, TrainerConfig, set_seed

__all__ = ["DeltaQuantizer", "code_cost_factor", "exact_update", "fake_quant", "finetune", "quantized", "FINETUNE_SHARE",
           "FINETUNE_LR_SCALE", "MIN_RANK"]

#: The quantization-aware phase runs this share of the student's epochs (at least one) ...
FINETUNE_SHARE = 0.25
#: ... at this fraction of the student's learning rate (cosine to 0).
FINETUNE_LR_SCALE = 0.1

#: torch dtype -> safetensors name, for the float dtypes a ``qrows`` op takes
_DTYPE_NAMES = {td: name for td, name in dtypes.torch_dtypes(torch)[0].items() if name in quantdelta.DTYPES}
_WORD_TORCH = {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16}


#: Tensors of at least this rank have their deltas quantized (see the module docstring).
MIN_RANK = 2


def quantized(t: torch.Tensor) -> bool:
    """Whether the trainer quantizes this tensor's deltas."""
    return t.is_floating_point() and t.dim() >= MIN_RANK and t.numel() > 0


def fake_quant(latent: torch.Tensor, base: torch.Tensor, bits: int) -> torch.Tensor:
    """``base + scale * code`` as the patch will rebuild it (binary32 multiply, then add), for the forward
    pass: the scale per row and codes of :func:`nnpatch.quantdelta.quantize` (rank 2 or more)."""
    qmax = quantdelta.code_range(bits)[1]
    d = latent.detach().double() - base.double()
    top = d.abs().flatten(1).amax(1)
    scale = (top / qmax).float()
    shape = (-1,) + (1,) * (d.dim() - 1)
    s64 = torch.where(scale == 0, torch.ones_like(scale, dtype=torch.float64), scale.double()).reshape(shape)
    codes = torch.round(d / s64).clamp(-qmax, qmax)
    codes = torch.where(scale.reshape(shape) == 0, torch.zeros_like(codes), codes)
    new = base.float() + scale.reshape(shape) * codes.float()  # two roundings, as the spec's arithmetic
    keep = (codes == 0) | ~torch.isfinite(base.float())
    return torch.where(keep, base, new.to(base.dtype)).reshape(base.shape)


class DeltaQuantizer:
    """Straight-through quantization of a model's parameter deltas (see the module docstring).

    ``attach(optimizer)`` hooks the model's forward and the optimizer's step; ``detach()`` removes the
    hooks and leaves the latent weights in the model."""

    def __init__(self, model: nn.Module, base_state: dict[str, torch.Tensor], bits: int) -> None:
        self.model, self.bits = model, bits
        self.params = [(name, p, base_state[name].detach().to(p.device, p.dtype))
                       for name, p in model.named_parameters() if name in base_state and quantized(p)]
        self._latent: list[torch.Tensor] | None = None
        self._handles: list = []

    def attach(self, optimizer: torch.optim.Optimizer) -> DeltaQuantizer:
        self._handles = [self.model.register_forward_pre_hook(lambda m, args: self.install()),
                         self.model.register_forward_hook(lambda m, args, out: None if m.training else self.restore()),
                         optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.restore())]
        return self

    def detach(self) -> None:
        self.restore()
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def install(self) -> None:
        """The quantized weights in place of the latent ones (kept aside), for a forward pass."""
        if self._latent is not None:
            return
        self._latent = [p.detach().clone() for _, p, _ in self.params]
        for (_, p, base), latent in zip(self.params, self._latent):
            p.copy_(fake_quant(latent, base, self.bits))

    @torch.no_grad()
    def restore(self) -> None:
        """The latent weights back (before an optimizer step: the straight-through gradient moves them)."""
        if self._latent is None:
            return
        for (_, p, _), latent in zip(self.params, self._latent):
            p.copy_(latent)
        self._latent = None


def finetune(student: nn.Module, teacher: nn.Module | None, base_state: dict[str, torch.Tensor], train_ds,
             config: TrainerConfig, bits: int, *, epochs: int | None = None,
             log: Callable[[str], None] | None = None) -> Trainer | None:
    """Train ``student`` for a few epochs with quantized deltas in every forward pass (straight-through),
    moving only the elements that already differ from ``base_state``; returns the Trainer (None for
    0 epochs: nothing to do)."""
    if epochs is None:
        epochs = max(1, round(config.epochs * FINETUNE_SHARE)) if FINETUNE_SHARE > 0 else 0
    if epochs == 0:  # quantized after training only (exact_update)
        return None
    set_seed(config.seed + 3)
    buffers = {k: v.detach().clone() for k, v in student.named_buffers()}
    masks = {name: (p.detach() != base_state[name].to(p.device, p.dtype))
             for name, p in student.named_parameters() if name in base_state and p.is_floating_point()}
    masks = {name: m for name, m in masks.items() if bool(m.any())}  # tensors the update left alone stay so
    frozen = [p for name, p in student.named_parameters() if name not in masks]
    for p in frozen:
        p.requires_grad_(False)
    cfg = dataclasses.replace(config, ratio=None, budget_bytes=None, epochs=epochs,
                              lr=config.lr * FINETUNE_LR_SCALE, checkpoint_path=None, max_steps=None)
    tr = Trainer(cfg, student, train_ds, teacher=teacher)
    params = dict(student.named_parameters())
    handles = [params[name].register_hook(lambda g, m=m: g * m) for name, m in masks.items()]

    @torch.no_grad()
    def reset_unchanged(opt, args, kwargs) -> None:  # weight decay must not move what the update left alone
        for name, m in masks.items():
            p = params[name]
            p.copy_(torch.where(m, p, base_state[name].to(p.device, p.dtype)))

    handles.append(tr.optimizer.register_step_post_hook(reset_unchanged))
    norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]

    def norms_in_eval_mode(module, args) -> None:  # None: a pre-hook's return value would replace the input
        for n in norms:
            n.eval()
    handles.append(student.register_forward_pre_hook(norms_in_eval_mode))
    quantizer = DeltaQuantizer(student, base_state, bits).attach(tr.optimizer)
    if log:
        log(f"quantization-aware deltas ({bits} bits): {epochs} epoch(s) at lr {cfg.lr:g}")
    try:
        tr.run()
    finally:
        quantizer.detach()
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for k, v in student.named_buffers():
                v.copy_(buffers[k])
    return tr


def code_cost_factor(base_state: dict[str, torch.Tensor], bits: int) -> float:
    """Patch bytes per raw byte of a changed channel when its deltas are ``bits``-bit codes (for
    ``--budget``): a code's bytes over the mean item size of the quantized tensors (codes hardly compress;
    a row's scale is left out)."""
    sizes = [(t.numel(), t.element_size()) for t in base_state.values() if quantized(t)]
    elements = sum(n for n, _ in sizes)
    itemsize = sum(n * w for n, w in sizes) / elements if elements else 4.0
    return bits / 8 / itemsize


def exact_update(latent: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor],
                 bits: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantDelta]]:
    """The final weights of the tensors in ``latent``, computed from the base file's bits by the spec's
    arithmetic.

    ``latent``: trained tensors (the full-precision weights, any float dtype) by name; ``base_state``: the
    base file's tensors. Each tensor that is F32, BF16 or F16 of rank 2 or more in the base file gets its
    deltas quantized (:func:`nnpatch.quantdelta.quantize`, from the full-precision values) and rebuilt
    (:meth:`QuantDelta.apply`); rows whose codes are all 0 stay M0's, bit for bit. Returns the new
    tensors in the base file's dtypes (those of ``latent`` that quantization applies to) and the deltas of
    those that changed, by name."""
    out: dict[str, torch.Tensor] = {}
    deltas: dict[str, QuantDelta] = {}
    for name, value in latent.items():
        base = base_state[name].detach().cpu().contiguous()
        dtype = _DTYPE_NAMES.get(base.dtype)
        if dtype is None or not quantized(base) or tuple(value.shape) != tuple(base.shape):
            continue
        rows = base.shape[0]
        words = base.view(torch.uint8).numpy().view(quantdelta.word_dtype(dtype)).reshape(rows, -1)
        target = value.detach().cpu().double().numpy().reshape(rows, -1)
        scales, codes = quantdelta.quantize(words, target, dtype, bits)
        changed = np.flatnonzero(codes.any(axis=1))
        if not len(changed):
            out[name] = base.clone()
            continue
        qd = QuantDelta(changed, scales[changed], codes[changed], bits)
        made = qd.apply(words, dtype)
        out[name] = torch.from_numpy(made.view(np.uint8).reshape(-1).copy()).view(base.dtype).reshape(base.shape)
        deltas[name] = qd
    return out, deltas
