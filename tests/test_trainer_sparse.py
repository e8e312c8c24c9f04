"""SparseUpdate, the schedule, KD losses and the Trainer on tiny CPU models."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from nnpatch.errors import TrainingError, UsageError  # noqa: E402
from nnpatch.trainer import (  # noqa: E402
    PruneSchedule,
    SparseUpdate,
    Trainer,
    TrainerConfig,
    changed_channels,
    kd_loss,
    set_seed,
)
from nnpatch.trainer.kd import task_loss  # noqa: E402

pytestmark = pytest.mark.torch


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :3].sum((1, 2)) > 0).long()
    return TensorDataset(x, y)


def raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def frozen_slices_identical(su, base):
    """Every frozen channel slice is bit-identical to the base."""
    state = su.model.state_dict()
    for g in su.groups:
        frozen = (~su.masks[g.name]).nonzero().flatten()
        for m in g.members:
            for c in frozen.tolist():
                if not m.start <= c < m.stop:
                    continue
                if m.axis is None:
                    a, b = state[m.key], base[m.key]
                else:
                    a = state[m.key].select(m.axis, c - m.start)
                    b = base[m.key].select(m.axis, c - m.start)
                if raw(a) != raw(b):
                    return f"{m.key}[{c}]"
    return None


def test_manual_loop_masks_grads_state_and_weights():
    set_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    su = SparseUpdate(model, base, ratio=0.25, schedule=PruneSchedule("cubic", end=0.5, events=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)  # decay moves every weight
    ds = data()
    total = 24
    for step in range(total):
        x, y = ds.tensors[0][step * 4 % 96:][:16], ds.tensors[1][step * 4 % 96:][:16]
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        su.after_backward()
        if su.num_kept < su.num_channels:
            # gradients of frozen channels are zero
            for g in su.groups:
                frozen = ~su.masks[g.name]
                for m in g.members:
                    t = su.tensors[m.key]
                    if t.grad is None or m.axis is None:
                        continue
                    sel = frozen[m.start:m.stop].nonzero().flatten()
                    assert float(t.grad.index_select(m.axis, sel).abs().sum()) == 0.0
        opt.step()
        su.after_step(opt)
        if su.num_kept < su.num_channels:
            # optimizer state of frozen channels is zero; weights and BN stats are the base bits
            for g in su.groups:
                frozen = ~su.masks[g.name]
                for m in g.members:
                    t = su.tensors[m.key]
                    st = opt.state.get(t)
                    if not st:
                        continue
                    sel = frozen[m.start:m.stop].nonzero().flatten()
                    assert float(st["exp_avg"].index_select(m.axis, sel).abs().sum()) == 0.0
                    assert float(st["exp_avg_sq"].index_select(m.axis, sel).abs().sum()) == 0.0
            assert frozen_slices_identical(su, base) is None
        su.on_step(step + 1, total, opt)
    assert su.events_done == 4
    su.finalize()
    rep = su.verify(base)
    assert rep["channels_changed"] <= math.floor(0.25 * su.num_channels)
    assert su.num_kept == math.floor(0.25 * su.num_channels)
    assert frozen_slices_identical(su, base) is None
    # num_batches_tracked went back to the base value
    assert raw(model.bn1.num_batches_tracked) == raw(base["bn1.num_batches_tracked"])
    # kept channels did move
    assert rep["channels_changed"] > 0


def test_frozen_bn_channels_use_running_stats_and_keep_them():
    set_seed(1)
    model = Tiny()
    with torch.no_grad():  # non-trivial running stats
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    su = SparseUpdate(model, base, ratio=0.5)
    keep = su.mask_vector().clone()
    keep[:] = False
    keep[[0, 2, 4]] = True  # conv1 channels 0, 2, 4 stay free; 1, 3, 5 frozen
    su.set_mask_vector(keep)
    model.train()
    x = torch.randn(8, 1, 6, 6)
    act = {}
    model.bn1.register_forward_hook(lambda m, i, o: act.update(inp=i[0].detach(), out=o.detach()))
    model(x).sum().backward()
    frozen = torch.tensor([1, 3, 5])
    expect = nn.functional.batch_norm(act["inp"][:, frozen], base["bn1.running_mean"][frozen],
                                      base["bn1.running_var"][frozen], model.bn1.weight[frozen],
                                      model.bn1.bias[frozen], False, 0.0, model.bn1.eps)
    assert torch.allclose(act["out"][:, frozen], expect, atol=1e-6)
    # free channels use batch statistics (mean ~0 over the batch)
    free_mean = act["out"][:, [0, 2, 4]].mean((0, 2, 3)) - model.bn1.bias[[0, 2, 4]].detach()
    assert float(free_mean.abs().max()) < 1e-4
    su.after_backward()  # restores the running stats the forward touched
    assert raw(model.bn1.running_mean[frozen]) == raw(base["bn1.running_mean"][frozen])
    assert raw(model.bn1.running_var[frozen]) == raw(base["bn1.running_var"][frozen])
    assert raw(model.bn1.running_mean[[0, 2, 4]]) != raw(base["bn1.running_mean"][[0, 2, 4]])


def test_schedule_plans():
    s = PruneSchedule("cubic", end=0.5, events=5)
    plan = s.plan(100)
    assert [p[0] for p in plan] == [10, 20, 30, 40, 50]
    shares = [s.share(p, 0.1) for _, p in plan]
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0.1 and shares[0] < 1.0
    assert PruneSchedule("oneshot", end=0.7).plan(10) == [(7, 1.0)]
    assert PruneSchedule("start").plan(10) == [(0, 1.0)]
    assert len(PruneSchedule("linear", events=50).plan(7)) <= 7
    with pytest.raises(ValueError):
        PruneSchedule("sometimes")


def run_trainer(tmp_path=None, **kw):
    set_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = Tiny()
    kw = {"ratio": 0.2, **kw}
    cfg = TrainerConfig(epochs=3, batch_size=16, lr=1e-2, weight_decay=0.1, seed=3, **kw)
    tr = Trainer(cfg, model, data(), base_state=base, teacher=teacher)
    return tr, base


def test_trainer_keeps_the_channel_rule_and_calls_back():
    tr, base = run_trainer()
    events = []
    tr.add_callback("on_prune", lambda t: events.append(("prune", t.sparse.num_kept)))
    tr.add_callback("on_epoch_end", lambda t: events.append(("epoch", t.step)))
    tr.add_callback("on_train_end", lambda t: events.append(("end", t.step)))
    tr.run()
    rep = changed_channels(tr.model, base, tr.sparse.groups)
    assert 0 < rep["channels_changed"] <= math.floor(0.2 * rep["channels_total"])
    assert frozen_slices_identical(tr.sparse, base) is None
    assert [e for e in events if e[0] == "epoch"] == [("epoch", 6), ("epoch", 12), ("epoch", 18)]
    assert events[-1] == ("end", 18)
    kept = [e[1] for e in events if e[0] == "prune"]
    assert kept == sorted(kept, reverse=True) and kept[-1] == tr.sparse.num_kept
    tr.sparse.verify(base)


def test_verify_refuses_a_moved_frozen_channel_as_a_training_error():
    tr, base = run_trainer()
    tr.run()
    frozen = (~tr.sparse.masks["conv1"]).nonzero().flatten()
    assert frozen.numel() > 0
    with torch.no_grad():
        tr.model.conv1.weight[int(frozen[0])] += 1.0
    with pytest.raises(TrainingError, match="frozen channels differ from the base: conv1"):
        tr.sparse.verify(base)
    assert TrainingError.exit_code == 1


def test_budget_and_random_selection():
    tr, base = run_trainer(budget_bytes=400, ratio=None)
    tr.run()
    rep = tr.sparse.report()
    assert 0 < rep["bytes_kept_estimate"] <= 400
    tr.sparse.verify(base)

    # norm values that change in every channel are paid from the budget first, and no channel's cost counts them
    tr, base = run_trainer(budget_bytes=400, ratio=None, norm_stats="affine")
    su = tr.sparse
    assert su.free_bytes == sum(base[f"{bn}.{t}"].numel() * 4 for bn in ("bn1", "bn2")
                                for t in ("running_mean", "running_var", "weight", "bias")) == 4 * 4 * (6 + 8)
    frozen_costs = SparseUpdate(Tiny(), base, budget_bytes=400).channel_bytes
    assert torch.equal(frozen_costs - su.channel_bytes, torch.tensor([16] * 6 + [16] * 8 + [0] * 4))
    assert su.target_for(1.0) == {"budget": 400.0 - su.free_bytes}
    tr.run()
    rep = su.report()
    assert su.free_bytes < rep["bytes_kept_estimate"] <= 400
    su.verify(base)
    with pytest.raises(UsageError, match="a budget of 200 bytes leaves nothing for channels: with --norm-stats "
                                         "affine the norm values of every channel take 224 bytes"):
        SparseUpdate(Tiny(), base, budget_bytes=200, norm_stats="affine")

    tr, base = run_trainer(selection="random", schedule="start")
    kept_before = tr.sparse.mask_vector().clone()
    tr.run()
    assert int(tr.sparse.mask_vector().sum()) == math.floor(0.2 * tr.sparse.num_channels)
    assert int(kept_before.sum()) == tr.sparse.num_channels  # pruned at run start, not before
    rep = changed_channels(tr.model, base, tr.sparse.groups)
    assert not bool((rep["changed_vector"] & ~tr.sparse.mask_vector()).any())


def test_resume_from_checkpoint_is_exact(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    straight, _ = run_trainer()
    straight.run()

    first, _ = run_trainer(checkpoint_path=str(ckpt), max_steps=7)
    first.run()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == 7 and set(state) >= {"config", "step", "masks", "optimizer", "model", "rng"}
    assert state["masks"] and state["config"]["ratio"] == 0.2
    second, _ = run_trainer(checkpoint_path=str(ckpt))
    second.run(resume_from=ckpt)
    a = straight.model.state_dict()
    b = second.model.state_dict()
    assert all(raw(a[k]) == raw(b[k]) for k in a)
    assert torch.equal(straight.sparse.mask_vector(), second.sparse.mask_vector())


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    total = 0.0
    for i in range(2):
        p = softmax(t[i].numpy() / T)
        q = softmax(s[i].numpy() / T)
        total += float(np.sum(p * (np.log(p) - np.log(q))))
    expect = total / 2 * T * T
    assert abs(float(kd_loss(s, t, "classification", T)) - expect) < 1e-5
    assert float(kd_loss(t, t, "classification", 3.0)) == pytest.approx(0.0, abs=1e-7)
    # regression: mean squared error, temperature ignored
    a = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert float(kd_loss(a, b, "regression", 7.0)) == pytest.approx((1 + 0 + 0 + 4) / 4)
    # gradients flow to the student only
    s2 = s.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    kd_loss(s2, t2, "classification", T).backward()
    assert s2.grad is not None and t2.grad is None
    with pytest.raises(ValueError):
        kd_loss(s, t, "ranking")
    with pytest.raises(ValueError):
        task_loss(s, t, "ranking")


@pytest.mark.parametrize("mode, free", [("adapt", ("running_mean", "running_var")),
                                        ("affine", ("running_mean", "running_var", "weight", "bias"))])
def test_adapted_norm_stats_move_in_every_channel_and_nothing_else_does(mode, free):
    set_seed(2)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    su = SparseUpdate(model, base, ratio=0.25, schedule="start", norm_stats=mode)
    assert su.free_stats == {f"{bn}.{t}" for bn in ("bn1", "bn2") for t in free}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = data()
    model.train()
    for step in range(12):
        x, y = ds.tensors[0][step * 8:(step + 1) * 8] * 3 + 1, ds.tensors[1][step * 8:(step + 1) * 8]  # shifted
        opt.zero_grad()
        task_loss(model(x), y, "classification").backward()
        su.after_backward()
        opt.step()
        su.after_step(opt)
        su.on_step(step + 1, 12)
    su.finalize()
    frozen = ~su.mask_vector()
    assert int(frozen.sum()) > 0
    # every free norm value followed the shifted data, frozen channels' included ...
    for key in su.free_stats:
        assert bool(_differs(model.state_dict()[key], base[key]).all()), key
    # ... while every frozen channel's parameters are bit-identical to the base
    state = model.state_dict()
    for g in su.groups:
        for m in g.members:
            if m.key in su.free_stats:
                continue
            for c in (~su.masks[g.name]).nonzero().flatten().tolist():
                if m.start <= c < m.stop and m.axis is not None:
                    assert raw(state[m.key].select(m.axis, c - m.start)) == raw(base[m.key].select(m.axis, c - m.start))
    rep = su.verify(base)
    assert rep["channels_changed"] <= math.floor(0.25 * su.num_channels)
    assert rep["stats_changed"] == sum(base[k].numel() for k in su.free_stats)
    # counted without the exemption, the statistics make every norm channel look changed
    strict = changed_channels(model, base, su.groups)
    assert strict["channels_changed"] > rep["channels_changed"]
    assert torch.equal(state["bn1.num_batches_tracked"], base["bn1.num_batches_tracked"])


def test_frozen_norm_stats_is_the_default_and_unknown_modes_are_refused():
    model = Tiny()
    assert SparseUpdate(model, ratio=0.5).free_stats == set()
    with pytest.raises(ValueError, match="norm_stats"):
        SparseUpdate(model, ratio=0.5, norm_stats="sometimes")


def _differs(a, b):
    return a.contiguous().view(torch.int32) != b.contiguous().view(torch.int32)
