"""group_channels: which tensors form a channel, on the layer shapes that matter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from nnpatch.trainer import group_channels  # noqa: E402

pytestmark = pytest.mark.torch


def by_name(groups):
    return {g.name: g for g in groups}


def assert_partition(model, groups):
    """Every floating-point state-dict tensor is in exactly one group, with consistent shapes."""
    state = model.state_dict()
    seen = {}
    for g in groups:
        assert g.size >= 1
        for m in g.members:
            assert m.key not in seen, f"{m.key} in {seen.get(m.key)} and {g.name}"
            seen[m.key] = g.name
            t = state[m.key]
            if m.axis is None:
                assert g.size == 1 and (m.start, m.stop) == (0, 1)
            else:
                assert t.shape[m.axis] == m.stop - m.start
                assert 0 <= m.start < m.stop <= g.size
        covered = torch.zeros(g.size, dtype=torch.int64)
        for m in g.members:
            covered[m.start:m.stop] += 1
        assert bool((covered > 0).all()), f"{g.name}: channel without a tensor"
    floats = {k for k, v in state.items() if torch.is_floating_point(v)}
    assert set(seen) == floats


def test_conv_bn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=True), nn.Flatten())
    groups = group_channels(model)
    g = by_name(groups)
    assert g["0"].size == 8 and g["0"].kind == "conv"
    assert g["0"].keys == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert g["0"].norm == "1"
    assert g["3"].keys == ["3.weight", "3.bias"] and g["3"].norm is None
    assert "1" not in g  # the BN joined its conv
    assert_partition(model, groups)
    # num_batches_tracked is in no group
    assert all("num_batches_tracked" not in k for gr in groups for k in gr.keys)


def test_linear_and_layernorm():
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3, bias=False))
    groups = group_channels(model)
    g = by_name(groups)
    assert g["0"].keys == ["0.weight", "0.bias", "1.weight", "1.bias"] and g["0"].size == 12
    assert g["0"].norm is None  # LayerNorm has no running stats
    assert g["3"].keys == ["3.weight"] and g["3"].size == 3
    assert_partition(model, groups)
    ppc = g["0"].params_per_channel(model.state_dict())
    assert ppc.tolist() == [6 + 1 + 2] * 12


class Residual(nn.Module):
    def __init__(self, cin=4, cout=8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_s = nn.BatchNorm2d(cout)
        self.post = nn.BatchNorm2d(cout)  # after the add: a stand-alone norm
        self.head = nn.Linear(cout, 2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + self.bn_s(self.short(x))
        y = self.post(torch.relu(y))
        return self.head(y.mean((2, 3)))


def test_residual_block():
    model = Residual()
    groups = group_channels(model)
    g = by_name(groups)
    assert g["conv1"].norm == "bn1" and g["conv2"].norm == "bn2" and g["short"].norm == "bn_s"
    assert "bn1.weight" in g["conv1"].keys and "bn_s.running_var" in g["short"].keys
    assert g["post"].kind == "norm" and g["post"].size == 8 and g["post"].norm == "post"
    assert_partition(model, groups)


class Untraceable(Residual):
    def forward(self, x):
        if float(x.sum()) > 0:  # data-dependent control flow: FX cannot trace this
            x = x * 2
        return super().forward(x)


def test_fallback_without_fx():
    model = Untraceable()
    g = by_name(group_channels(model))
    assert g["conv1"].norm == "bn1" and g["conv2"].norm == "bn2" and g["short"].norm == "bn_s"
    assert_partition(model, list(g.values()))


class SepAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(a @ self.v(x))


class MHABlock(nn.Module):
    def __init__(self, d=8, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.ln = nn.LayerNorm(d)

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.ln(x + self.attn(x, kv, kv)[0])


def test_attention_projections():
    model = MHABlock()
    groups = group_channels(model)
    g = by_name(groups)
    assert g["attn"].kind == "attention_in_proj" and g["attn"].size == 24
    assert g["attn"].keys == ["attn.in_proj_weight", "attn.in_proj_bias"]
    assert g["attn.out_proj"].kind == "linear" and g["attn.out_proj"].size == 8
    assert g["ln"].kind == "norm"  # after a residual add: stand-alone
    assert_partition(model, groups)

    sep = MHABlock(kdim=5)  # separate q/k/v projection weights
    g2 = by_name(group_channels(sep))
    spans = {m.key: (m.start, m.stop) for m in g2["attn"].members}
    assert spans == {"attn.q_proj_weight": (0, 8), "attn.k_proj_weight": (8, 16),
                     "attn.v_proj_weight": (16, 24), "attn.in_proj_bias": (0, 24)}
    assert_partition(sep, list(g2.values()))

    lin = SepAttention()
    g3 = by_name(group_channels(lin))
    assert {n: gr.size for n, gr in g3.items()} == {"q": 8, "k": 8, "v": 8, "o": 8}
    assert_partition(lin, list(g3.values()))


class Misc(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.cls = nn.Parameter(torch.zeros(1, 4))
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.up = nn.ConvTranspose1d(4, 6, 2, stride=2)
        self.gru = nn.GRU(6, 5)

    def forward(self, tokens):
        x = torch.cat([self.cls.expand(tokens.shape[0], 1, 4), self.emb(tokens)], 1) * self.scale
        y = self.up(x.transpose(1, 2)).transpose(1, 2)
        return self.gru(y)[0]


def test_embedding_transposed_conv_rnn_and_loose_tensors():
    model = Misc()
    groups = group_channels(model)
    g = by_name(groups)
    assert g["emb"].kind == "embedding" and g["emb"].size == 11
    assert g["cls"].kind == "tensor" and g["cls"].size == 1 and g["cls"].members[0].axis is None
    assert g["scale"].kind == "tensor"
    assert "steps" not in g  # integer buffer: no group
    assert g["up"].size == 6 and g["up"].members[0].axis == 1
    rnn = [gr for gr in groups if gr.kind == "recurrent"]
    assert len(rnn) == 1 and rnn[0].size == 15 and len(rnn[0].members) == 4
    assert_partition(model, groups)
