"""Channel groups: the units a sparse update keeps or freezes.

A *channel* is one output slice of a producer layer together with every
per-channel tensor that belongs to it.  A :class:`ChannelGroup` gathers the
channels of one producer (or of one stand-alone tensor) and says, for each
state-dict tensor involved, which axis indexes the channel.

Rules (applied to the model's ``state_dict()`` keys, in this order):

* **Producers** -- ``nn.Conv{1,2,3}d`` (weight axis 0, bias), ``nn.ConvTranspose*``
  with ``groups == 1`` (weight axis 1, bias), ``nn.Linear`` (rows, bias; this
  covers ``MultiheadAttention.out_proj``), ``nn.Bilinear`` (axis 0),
  ``nn.MultiheadAttention`` input projections (``in_proj_weight`` rows and
  ``in_proj_bias``, or ``q/k/v_proj_weight`` as channels ``[0,E)``,
  ``[E,2E)``, ``[2E,3E)`` of one group sharing ``in_proj_bias``), recurrent
  layers (per layer and direction: ``weight_ih``/``weight_hh``/``bias_*`` rows =
  gate units) and ``nn.Embedding``/``nn.EmbeddingBag`` (one row = one channel).
* **Norms that follow a producer** -- a ``BatchNorm``, ``LayerNorm`` (1-D
  shape), ``GroupNorm``, ``InstanceNorm`` or ``RMSNorm`` whose input is exactly the
  producer's output (found by ``torch.fx`` tracing; if tracing fails, by
  registration order: the leaf module right before the norm) and whose
  channel count matches joins the producer's group: its ``weight``, ``bias``,
  ``running_mean`` and ``running_var`` entry *c* belong to channel *c*.
* **Stand-alone norms** -- their per-feature tensors form a group of their own
  (one channel per feature).
* **Everything else** -- every remaining floating-point tensor (a ``cls``
  token, a positional embedding, a layer scale, a float buffer, a parameter of
  a module type not listed above) is a group of **one channel holding the whole
  tensor**.  It counts as one channel in the kept share and competes on L1
  distance like any other; its parameter count is reported in the
  %-parameters figure.
* Non-floating tensors (``num_batches_tracked``, integer/bool buffers) are in
  no group; the trainer resets them to their base values, so they never count
  as a change.

Tied tensors (one tensor under several keys) are grouped under their first key.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Member", "ChannelGroup", "group_channels", "unwrap_model", "ungrouped_keys"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.modules.batchnorm._BatchNorm,)
_IN = (nn.modules.instancenorm._InstanceNorm,)
_NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                            nn.modules.instancenorm._InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)
_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Member:
    """One tensor of a group: channels ``[start, stop)`` of the group are the
    slices ``index = c - start`` along ``axis``.  ``axis is None``: the whole
    tensor is the group's single channel."""

    key: str
    axis: int | None
    start: int
    stop: int


@dataclass
class ChannelGroup:
    """The channels of one producer layer (or one stand-alone tensor)."""

    name: str
    kind: str
    size: int
    members: list[Member] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    norm: str | None = None  # module path of a running-stats norm inside the group

    @property
    def keys(self) -> list[str]:
        return [m.key for m in self.members]

    def params_per_channel(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Number of scalars in each channel (int64 vector of ``size``)."""
        out = torch.zeros(self.size, dtype=torch.int64)
        for m in self.members:
            t = state[m.key]
            if m.axis is None:
                out += t.numel()
            else:
                out[m.start:m.stop] += t.numel() // max(1, t.shape[m.axis])
        return out

    def bytes_per_channel(self, state: dict[str, torch.Tensor], skip: frozenset[str] | set[str] = frozenset()) \
            -> torch.Tensor:
        """Raw bytes of each channel (int64 vector of ``size``), leaving out the tensors in ``skip``."""
        out = torch.zeros(self.size, dtype=torch.int64)
        for m in self.members:
            if m.key in skip:
                continue
            t = state[m.key]
            es = t.element_size()
            if m.axis is None:
                out += t.numel() * es
            else:
                out[m.start:m.stop] += (t.numel() // max(1, t.shape[m.axis])) * es
        return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _channels_of_producer(mod: nn.Module) -> int | None:
    if isinstance(mod, _CONV):
        return mod.out_channels
    if isinstance(mod, _CONVT):
        return mod.out_channels if mod.groups == 1 else None
    if isinstance(mod, (nn.Linear, nn.Bilinear)):
        return mod.out_features
    return None


def _norm_channels(mod: nn.Module) -> int | None:
    if isinstance(mod, _BN + _IN):
        return mod.num_features
    if isinstance(mod, nn.GroupNorm):
        return mod.num_channels
    if isinstance(mod, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm)):
        shape = tuple(mod.normalized_shape)
        return shape[0] if len(shape) == 1 else None
    return None


def _fx_producer_of_norm(model: nn.Module) -> dict[str, str] | None:
    """norm module path -> producer module path, from an FX trace (None if untraceable)."""
    try:
        import torch.fx as fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return None
    result: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        try:
            mod = model.get_submodule(node.target)
        except AttributeError:
            continue
        if not isinstance(mod, _NORMS) or not node.args:
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            result.setdefault(str(node.target), str(src.target))
    return result


def _order_producer_of_norm(model: nn.Module) -> dict[str, str]:
    """Fallback: a norm follows the leaf module registered right before it."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    result: dict[str, str] = {}
    for (pn, _pm), (nn_, nm) in zip(leaves, leaves[1:]):
        if isinstance(nm, _NORMS):
            result[nn_] = pn
    return result


def group_channels(model: nn.Module) -> list[ChannelGroup]:
    """Split every floating-point tensor of ``model.state_dict()`` into channel groups.

    Each floating-point state-dict key appears in exactly one group (tied aliases
    excepted); see the module docstring for the rules.  Groups come in module
    registration order.
    """
    model = unwrap_model(model)
    state = model.state_dict(keep_vars=True)
    owner_of: dict[int, str] = {}
    for k, t in state.items():
        owner_of.setdefault(id(t), k)
    claimed: set[str] = set()
    groups: list[ChannelGroup] = []
    modules = dict(model.named_modules())

    def has(prefix: str, name: str) -> str | None:
        k = _key(prefix, name)
        t = state.get(k)
        if t is None or not torch.is_floating_point(t) or owner_of.get(id(t)) != k or k in claimed:
            return None
        return k

    producer_of_norm = _fx_producer_of_norm(model)
    if producer_of_norm is None:
        producer_of_norm = _order_producer_of_norm(model)
    norm_of_producer: dict[str, str] = {}
    for norm_name, prod_name in producer_of_norm.items():
        prod = modules.get(prod_name)
        norm = modules.get(norm_name)
        if prod is None or norm is None:
            continue
        c = _channels_of_producer(prod)
        if c is not None and c == _norm_channels(norm) and prod_name not in norm_of_producer:
            norm_of_producer[prod_name] = norm_name
    attached_norms = set(norm_of_producer.values())

    def add_norm(group: ChannelGroup, norm_name: str) -> None:
        norm = modules[norm_name]
        for nk in _NORM_KEYS:
            k = has(norm_name, nk)
            if k is not None and state[k].dim() >= 1 and state[k].shape[0] == group.size:
                group.members.append(Member(k, 0, 0, group.size))
                claimed.add(k)
        group.modules.append(norm_name)
        if isinstance(norm, _BN + _IN) and getattr(norm, "track_running_stats", False):
            group.norm = norm_name

    for name, mod in modules.items():
        if name in attached_norms:
            continue
        g: ChannelGroup | None = None
        if isinstance(mod, _CONV) or isinstance(mod, (nn.Linear, nn.Bilinear)) or (
                isinstance(mod, _CONVT) and mod.groups == 1):
            size = _channels_of_producer(mod)
            assert size is not None
            axis = 1 if isinstance(mod, _CONVT) else 0
            kind = "conv" if isinstance(mod, _CONV + _CONVT) else "linear"
            g = ChannelGroup(name or "<root>", kind, size, modules=[name])
            for pname, ax in (("weight", axis), ("bias", 0)):
                k = has(name, pname)
                if k is not None and state[k].dim() > ax and state[k].shape[ax] == size:
                    g.members.append(Member(k, ax, 0, size))
                    claimed.add(k)
            if name in norm_of_producer:
                add_norm(g, norm_of_producer[name])
        elif isinstance(mod, nn.MultiheadAttention):
            e = mod.embed_dim
            g = ChannelGroup(name or "<root>", "attention_in_proj", 3 * e, modules=[name])
            k = has(name, "in_proj_weight")
            if k is not None:
                g.members.append(Member(k, 0, 0, 3 * e))
                claimed.add(k)
            for i, pn in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                k = has(name, pn)
                if k is not None:
                    g.members.append(Member(k, 0, i * e, (i + 1) * e))
                    claimed.add(k)
            k = has(name, "in_proj_bias")
            if k is not None:
                g.members.append(Member(k, 0, 0, 3 * e))
                claimed.add(k)
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            g = ChannelGroup(name or "<root>", "embedding", mod.num_embeddings, modules=[name])
            k = has(name, "weight")
            if k is not None:
                g.members.append(Member(k, 0, 0, mod.num_embeddings))
                claimed.add(k)
        elif isinstance(mod, nn.RNNBase):
            by_layer: dict[str, list[str]] = {}
            for pn, p in mod.named_parameters(recurse=False):
                if pn.startswith(("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l")):
                    suffix = pn.split("_l", 1)[1]
                    by_layer.setdefault(suffix, []).append(pn)
            for suffix, pnames in by_layer.items():
                size = getattr(mod, pnames[0]).shape[0]
                rg = ChannelGroup(f"{name}[l{suffix}]", "recurrent", size, modules=[name])
                for pn in pnames:
                    k = has(name, pn)
                    if k is not None and state[k].shape[0] == size:
                        rg.members.append(Member(k, 0, 0, size))
                        claimed.add(k)
                if rg.members:
                    groups.append(rg)
        elif isinstance(mod, _NORMS):
            size = _norm_channels(mod)
            if size is not None:
                g = ChannelGroup(name or "<root>", "norm", size, modules=[])
                add_norm(g, name)
        if g is not None and g.members:
            groups.append(g)

    for k, t in state.items():
        if k in claimed or owner_of.get(id(t)) != k or not torch.is_floating_point(t):
            continue
        groups.append(ChannelGroup(k, "tensor", 1, [Member(k, None, 0, 1)], modules=[]))
        claimed.add(k)
    return groups


def ungrouped_keys(model: nn.Module, groups: list[ChannelGroup]) -> list[str]:
    """State-dict keys that are in no group (non-float tensors, tied aliases)."""
    grouped = {k for g in groups for k in g.keys}
    return [k for k in unwrap_model(model).state_dict() if k not in grouped]
