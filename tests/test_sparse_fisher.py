"""Fisher-weighted channel selection and the student's learning-rate restart (issue 17, section 2)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from nnpatch.trainer import SparseUpdate, Trainer, TrainerConfig, changed_channels, set_seed  # noqa: E402
from nnpatch.trainer.tiny_updater import StudentTrainer, update  # noqa: E402

from .test_trainer_sparse import Tiny, data  # noqa: E402  (the same tiny CNN and task)

pytestmark = pytest.mark.torch




def test_fisher_scores_weigh_movement_by_the_second_moment():
    set_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    su = SparseUpdate(model, base, ratio=0.5, selection="fisher")
    assert su.selection == "fisher"
    with torch.no_grad():
        model.fc.weight[0] += 1.0   # moves a lot where the loss is flat
        model.fc.weight[1] += 0.1   # moves little where the loss is steep
    model.fc.weight.grad = torch.zeros_like(model.fc.weight)
    model.fc.weight.grad[1] = 100.0
    su.after_backward()             # no Adam: SparseUpdate keeps its own mean of squared gradients
    scores = su.fisher_scores()
    off = sum(g.size for g in su.groups[:[g.name for g in su.groups].index("fc")])
    assert scores[off + 1] > scores[off + 0] == 0.0
    # with AdamW, the optimizer's exp_avg_sq is the weight
    opt = torch.optim.AdamW(model.parameters())
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    opt.step()
    su.optimizer = opt
    v = opt.state[model.fc.weight]["exp_avg_sq"]
    d = (model.fc.weight.detach().double() - base["fc.weight"].double()) ** 2
    assert torch.allclose(su.fisher_scores()[off:off + 4], (v.double() * d).sum(1))


@pytest.mark.parametrize("mode, counted", [("adapt", True), ("affine", False)])
def test_norm_scale_and_shift_rank_channels_only_while_they_are_per_channel(mode, counted):
    """Under norm_stats="affine" every channel's scale and shift train, so their movement says
    nothing about which channels to keep and must not weigh in the ranking."""
    set_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    su = SparseUpdate(model, base, ratio=0.5, selection="fisher", norm_stats=mode)
    with torch.no_grad():
        model.bn1.weight[2] += 1.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.bn1.weight.grad[2] = 10.0
    su.after_backward()
    assert float(su.fisher_scores()[2]) > 0.0 if counted else float(su.fisher_scores().abs().sum()) == 0.0


@pytest.mark.parametrize("selection", ["fisher", "fisher_layer"])
def test_trainer_with_fisher_selection_keeps_the_channel_rule(selection):
    set_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainerConfig(epochs=3, batch_size=16, lr=1e-2, ratio=0.2, selection=selection)
    tr = Trainer(cfg, model, data()).run()
    rep = changed_channels(tr.model, base, tr.sparse.groups)
    assert 0 < rep["channels_changed"] <= math.floor(0.2 * rep["channels_total"])
    tr.sparse.verify(base)


def test_student_learning_rate_restarts_when_the_ramp_ends():
    set_seed(0)
    model = Tiny()
    cfg = TrainerConfig(epochs=4, batch_size=16, lr=1e-2, ratio=0.2, prune_end=0.25)
    plain = Trainer(cfg, Tiny(), data())
    student = StudentTrainer(cfg, model, data())
    total = student.total_steps()
    end = student.sparse.plan(total)[-1][0]
    assert 0 < end < total
    for s in range(end):
        assert student._lr_at(s) == plain._lr_at(s)
    assert student._lr_at(end) == pytest.approx(1e-2)
    assert plain._lr_at(end) < 1e-2
    assert student._lr_at(total) == pytest.approx(0.0, abs=1e-12)
    # no ramp (channels fixed before the first step): one cosine, as the Trainer
    start = StudentTrainer(TrainerConfig(epochs=4, batch_size=16, lr=1e-2, ratio=0.2, schedule="start"),
                           Tiny(), data())
    assert [start._lr_at(s) for s in range(total)] == [plain._lr_at(s) for s in range(total)]


def test_update_resumes_exactly_with_the_new_defaults(tmp_path):
    ds = data()
    set_seed(0)
    m0 = Tiny()
    cfg = TrainerConfig(epochs=3, batch_size=16, lr=1e-2, ratio=0.2, selection="fisher_layer", seed=1,
                        prune_end=0.6)  # the ramp spans the checkpoint at the end of epoch 1
    ckpt = tmp_path / "run.pt"
    straight = update(m0, ds, ds, config=cfg, teacher_epochs=1)
    interrupted = update(m0, ds, ds, config=TrainerConfig(**{**cfg.__dict__, "max_steps": 8}), teacher_epochs=1,
                         checkpoint=ckpt)
    assert interrupted["student"] is not None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["phase"] == "student"
    resumed = update(m0, ds, ds, config=cfg, teacher_epochs=1, checkpoint=ckpt, resume=state)
    a, b = straight["student"].state_dict(), resumed["student"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
