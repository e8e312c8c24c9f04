"""``train-sparse --delta-bits``: quantization-aware deltas (nnpatch/trainer/quant.py). The model written is
exactly the one the patch rebuilds, the patch uses ``qrows`` (format 1.3), and the channel rule holds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nnpatch  # noqa: E402
from nnpatch import quantdelta  # noqa: E402
from nnpatch.trainer.quant import DeltaQuantizer, exact_update, fake_quant  # noqa: E402

from .conftest import read  # noqa: E402
from .test_trainer_cli import invoke, tiny  # noqa: E402,F401 - the fixture

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_is_the_spec_arithmetic(bits):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    latent = base.clone()
    latent[[1, 4]] += torch.randn(2, 5, generator=g) * 0.01
    q = fake_quant(latent, base, bits)
    state, deltas = exact_update({"w": latent}, {"w": base}, bits)
    assert torch.equal(q.view(torch.int32), state["w"].view(torch.int32))
    assert torch.equal(q[[0, 2, 3, 5]], base[[0, 2, 3, 5]])  # unchanged rows stay M0's
    qd = deltas["w"]
    assert qd.rows.tolist() == [1, 4] and qd.bits == bits and len(qd.scales) == 2
    top = (latent - base).abs().amax(1)
    assert torch.all((q - latent).abs().amax(1) <= top / (2 ** (bits - 1) - 1) * 0.5 + 1e-7)


def test_exact_update_leaves_rank_1_alone_and_handles_bf16():
    bias = torch.tensor([1.0, -2.0, 0.5, 0.0])
    out, deltas = exact_update({"b": bias + 0.01}, {"b": bias}, 8)
    assert out == {} and deltas == {}  # a bias keeps its trained values and the ordinary ops
    base = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.bfloat16)
    new = base.float() + torch.tensor([[0.0, 0.25, 0.0], [0.0, 0.0, 0.0]])
    state, deltas = exact_update({"w": new}, {"w": base}, 8)
    qd = deltas["w"]
    assert qd.rows.tolist() == [0] and len(qd.scales) == 1
    words = base.view(torch.int16).numpy().view("<u2").reshape(2, 3)
    assert np.array_equal(qd.apply(words, "BF16"), state["w"].view(torch.int16).numpy().view("<u2"))
    same, none = exact_update({"w": base.float()}, {"w": base}, 8)
    assert none == {} and torch.equal(same["w"], base)


def test_straight_through_swaps_latent_weights():
    """Forward sees the quantized weights; the optimizer steps the latent ones."""
    model = torch.nn.Linear(4, 3)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(torch.linspace(-0.01, 0.013, 12).reshape(3, 4))
    latent = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    qz = DeltaQuantizer(model, base, 4).attach(opt)
    seen = {}
    model.register_forward_hook(lambda m, a, o: seen.update(w=m.weight.detach().clone()))
    model(torch.ones(1, 4)).sum().backward()
    assert torch.equal(seen["w"], fake_quant(latent, base["weight"], 4))
    assert not torch.equal(seen["w"], latent)
    opt.step()  # lr 0: the latent weights come back unchanged
    assert torch.equal(model.weight, latent)
    model.eval()
    model(torch.ones(1, 4))  # an evaluation forward leaves the latent weights in place
    assert torch.equal(model.weight, latent)
    qz.detach()


@pytest.mark.parametrize("bits, norm", [("8", "frozen"), ("4", "frozen"), ("8", "affine")])
def test_train_sparse_delta_bits_end_to_end(tiny, tmp_path, bits, norm):
    spec, base = tiny
    new, patch = tmp_path / "new.safetensors", tmp_path / "u.nnpatch"
    res = invoke(["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(base), "--epochs", "4",
                  "--teacher-epochs", "2", "--ratio", "0.5", "--delta-bits", bits, "--norm-stats", norm,
                  "-o", str(new), "--patch", str(patch), "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(res.stdout)
    assert rep["delta_bits"] == int(bits)
    assert (rep["norm_stats_changed"] > 0) == (norm == "affine")  # the norms' values: ordinary ops, not qrows
    assert rep["channels_changed"] <= math.floor(0.5 * rep["channels_total"])
    with nnpatch.read_patch(patch) as p:
        kinds = {op.kind for op in p.ops}
        assert "qrows" in kinds and p.header.version == ((1, 5) if p.header.packed else (1, 3))
        assert all(op.bits == int(bits) for op in p.ops if op.kind == "qrows")
    out = tmp_path / "applied.safetensors"
    nnpatch.apply(base, patch, out)
    assert read(out) == read(new)
    # the deltas file beside -o rebuilds the very same patch later (diff --quantized)
    assert rep["deltas"] == str(tmp_path / "new.deltas.safetensors")
    again = tmp_path / "again.nnpatch"
    nnpatch.diff(str(base), str(new), str(again), quantized=rep["deltas"])
    assert read(again) == read(patch)


def test_delta_bits_refused_values(tmp_path):
    res = invoke(["--recipe", "digits", "--delta-bits", "3", "-o", str(tmp_path / "n.safetensors"),
                  "--patch", str(tmp_path / "p.nnpatch")])
    assert res.exit_code == 2 and "--delta-bits" in res.output


def test_quantdelta_quantize_matches_fake_quant_on_f16():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 7, generator=g).half()
    latent = base.float() + torch.randn(4, 7, generator=g) * 0.05
    state, deltas = exact_update({"w": latent}, {"w": base}, 8)
    words = base.view(torch.int16).numpy().view("<u2").reshape(4, 7)
    s, c = quantdelta.quantize(words, latent.double().numpy(), "F16", 8)
    assert np.array_equal(deltas["w"].codes, c[deltas["w"].rows.astype(int)])
    assert np.array_equal(deltas["w"].apply(words, "F16"), state["w"].view(torch.int16).numpy().view("<u2"))


def test_budget_counts_codes_not_floats(tiny, tmp_path):
    """With --delta-bits, --budget counts a changed channel at the cost of its codes: a budget that every
    channel fits at 8 bits (the model's whole 8-bit patch is about 2.7 KB with packed sections, format 1.5;
    at full precision 3.5 KB holds 12 of its 18 channels) holds more channels quantized than at full
    precision, and both patches keep within it."""
    spec, base = tiny
    runs = {}
    for bits in (None, "8"):
        d = tmp_path / str(bits)
        args = ["--model", f"{spec}:model", "--data", f"{spec}:data", "--base", str(base), "--epochs", "3",
                "--teacher-epochs", "1", "--budget", "3500", "-o", str(d / "n.safetensors"),
                "--patch", str(d / "p.nnpatch"), "--json", "--delta-bits", bits or "off"]
        runs[bits] = invoke(args)
    quant = runs["8"]
    assert quant.exit_code == 0, quant.output + repr(quant.exception)
    rep = json.loads(quant.stdout)
    assert rep["budget_met"] and rep["patch_bytes"] <= 3500
    plain = runs[None]
    assert plain.exit_code == 0, plain.output + repr(plain.exception)
    full = json.loads(plain.stdout)
    assert full["budget_met"] and full["patch_bytes"] <= 3500
    assert full["channels_changed"] < rep["channels_changed"]
