"""Which lossless transform + zstd setting packs a fine-tune's changed values smallest?

Run from the repo root:

    .venv/bin/python benchmarks/codec_study.py            # dense, dense-bf16, channel (models.py pairs)
    .venv/bin/python benchmarks/codec_study.py --quick    # smaller models
    .venv/bin/python benchmarks/codec_study.py --sample-mb 16 --markdown bench-out/codec_study.md

In process, numpy + zstandard only.  For each pair the changed rows (dim 0)
of every changed tensor are collected, new and old bit patterns side by side,
exactly the values nnpatch's ``rows``/``whole`` ops store; when they exceed
``--sample-mb`` of new-value bytes a deterministic sample of 64 Ki-element
blocks spread over the stream is taken.  Sizes are % of the raw new-value
bytes; MB/s counts raw new-value bytes per second of transform + compress
(one thread, best of ``--repeat``).

``dense@0.1`` is the dense pair with the update scaled by 0.1 (old + 0.1 *
(new - old) in fp32), to show how the ratios depend on the update's size.

Transforms (the names match nnpatch codec stages where one exists):

* delta: ``none`` (the new values alone), ``xor`` (new ^ old),
  ``add`` (new - old mod 2^w), ``zadd`` (the same, zigzag-mapped);
* layout: ``-`` (as is), ``bytes`` (byte planes, nnpatch's ``planes``),
  ``bits`` (bit planes: bit k of every word packed together);
* framing: ``1f`` one zstd frame over everything, ``pf`` one frame per
  plane (each plane stored raw when zstd does not shrink it);
* zstd level 1, 3, 6, 9, 12, 19 (full grid at 1, 3 and 9, the other levels
  for the best pipelines), plus ``--long`` (LDM, window 2^27) and a
  literals-only setting (``lit``: fast strategy, min match 7, tiny tables,
  approximating per-plane Huffman) for the leaders.
* bounds: order-0 entropy of each byte plane (``H0 bytes``) and of each bit
  plane (``H0 bits``): what an ideal order-0 coder would need; the gap to
  zstd is what a better entropy stage could win.  ``H(byte | next byte up)``
  codes each byte knowing the more significant byte of the same word (a
  one-byte context model), a bound for a context-modelling coder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import zstandard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import models  # noqa: E402
from nnpatch.weights import SafetensorsFile  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BLOCK = 1 << 16
DELTAS = ("none", "xor", "add", "zadd")
LAYOUTS = (("-", "1f"), ("bytes", "1f"), ("bytes", "pf"), ("bits", "1f"), ("bits", "pf"))
GRID_LEVELS = (1, 3, 9)
EXTRA_LEVELS = (6, 12, 19)


# --- data --------------------------------------------------------------------

def changed_values(old: str, new: str, sample_bytes: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(new words, old words, width, total changed bytes) of the changed rows, sampled."""
    news, olds, width = [], [], None
    with SafetensorsFile(old) as a, SafetensorsFile(new) as b:
        for name in sorted(b.tensors):
            ti = b.tensors[name]
            if name not in a.tensors:
                continue
            nb, ob = b.bits(name), a.bits(name)
            if np.array_equal(nb, ob):
                continue
            width = ti.itemsize
            rows = ti.shape[0] if ti.shape else 1
            nr, orr = nb.reshape(rows, -1), ob.reshape(rows, -1)
            changed = (nr != orr).any(axis=1)
            news.append(np.ascontiguousarray(nr[changed]).reshape(-1))
            olds.append(np.ascontiguousarray(orr[changed]).reshape(-1))
    n, o = np.concatenate(news), np.concatenate(olds)
    total = n.nbytes
    limit = max(BLOCK, sample_bytes // width)
    if n.size > limit:
        nblocks = n.size // BLOCK
        take = np.unique(np.linspace(0, nblocks - 1, limit // BLOCK).round().astype(np.int64))
        idx = (take[:, None] * BLOCK + np.arange(BLOCK)[None, :]).reshape(-1)
        n, o = n[idx], o[idx]
    return n, o, width, total


def delta(n: np.ndarray, o: np.ndarray, kind: str) -> np.ndarray:
    if kind == "none":
        return n
    if kind == "xor":
        return n ^ o
    d = n - o
    if kind == "add":
        return d
    s = d.view(d.dtype.str.replace("u", "i"))
    return ((s << 1) ^ (s >> (8 * d.itemsize - 1))).view(d.dtype)


def planes(v: np.ndarray, layout: str) -> list[np.ndarray]:
    w = v.itemsize
    b = v.view(np.uint8)
    if layout == "-":
        return [b]
    if layout == "bytes":
        t = b.reshape(-1, w).T
        return [np.ascontiguousarray(t[k]) for k in range(w)]
    # bit planes: bit k of every word, most significant first
    out = []
    for k in range(8 * w - 1, -1, -1):
        out.append(np.packbits(((v >> v.dtype.type(k)) & v.dtype.type(1)).astype(np.uint8)))
    return out


def h0_bytes(buf: np.ndarray) -> float:
    """Order-0 entropy of a byte buffer, in bytes."""
    return _entropy_bytes(buf, 256)


def _entropy_bytes(codes: np.ndarray, alphabet: int) -> float:
    """Order-0 entropy, in bytes, of symbols drawn from ``range(alphabet)``."""
    c = np.bincount(codes, minlength=alphabet).astype(np.float64)
    p = c[c > 0] / codes.size
    return float(-(p * np.log2(p)).sum() * codes.size / 8)


def h_cond(v: np.ndarray) -> float:
    """Entropy in bytes of the byte planes when each byte is coded knowing the
    next more significant byte of the same word (top byte order-0): a simple
    context-model bound that plain planes + zstd cannot reach."""
    ps = planes(v, "bytes")
    total = h0_bytes(ps[-1])
    for k in range(len(ps) - 1):
        joint = ps[k + 1].astype(np.int64) * 256 + ps[k]
        total += h0_joint(joint) - h0_bytes(ps[k + 1])
    return total


def h0_joint(codes: np.ndarray) -> float:
    return _entropy_bytes(codes, 65536)


def h0_bits(v: np.ndarray) -> float:
    total = 0.0
    for k in range(8 * v.itemsize):
        p = float(((v >> v.dtype.type(k)) & v.dtype.type(1)).mean())
        if 0 < p < 1:
            total += -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) * v.size / 8
    return total


# --- encoders ------------------------------------------------------------------

def _cctx(level, mode: str):
    if mode == "lit":
        p = zstandard.ZstdCompressionParameters(window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7,
                                                target_length=0, strategy=zstandard.STRATEGY_FAST)
        return zstandard.ZstdCompressor(compression_params=p)
    if mode == "long":
        p = zstandard.ZstdCompressionParameters.from_level(level, enable_ldm=True, window_log=27)
        return zstandard.ZstdCompressor(compression_params=p)
    return zstandard.ZstdCompressor(level=level, write_content_size=True)


def encode(n, o, d: str, layout: str, framing: str, level: int, mode: str = "") -> int:
    cctx = _cctx(level, mode)
    ps = planes(delta(n, o, d), layout)
    if framing == "1f":
        if len(ps) == 1:
            return len(cctx.compress(ps[0]))
        return len(cctx.compress(np.concatenate(ps)))
    return sum(min(len(cctx.compress(p)), p.nbytes) for p in ps)


def timed(fn, repeat: int):
    best, val = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        val = fn()
        best = min(best, time.perf_counter() - t0)
    return val, best


# --- study --------------------------------------------------------------------

def study(pair: str, old: str, new: str, args, scale: float | None = None) -> dict:
    n, o, w, total = changed_values(old, new, int(args.sample_mb * (1 << 20)))
    if scale is not None:  # a smaller update of the same direction: old + scale * (new - old), in fp32
        of = o.view(np.float32)
        n = (of + np.float32(scale) * (n.view(np.float32) - of)).astype(np.float32).view(np.uint32)
    raw = n.nbytes
    rel = relative_change(n, o, w)
    print(f"== {pair}: width {w}, changed values {total:,} B, sample {raw:,} B", file=sys.stderr, flush=True)
    rows = []

    def add(d, layout, framing, level, mode=""):
        size, secs = timed(lambda: encode(n, o, d, layout, framing, level, mode), args.repeat)
        rows.append(dict(delta=d, layout=layout, framing=framing, level=level, mode=mode, size=size,
                         pct=100.0 * size / raw, mbs=raw / secs / 1e6))
        r = rows[-1]
        print(f"  {d:5} {layout:5} {framing} {mode or 'zstd'}-{level:<2}  {r['pct']:6.2f}%  {r['mbs']:7.1f} MB/s",
              file=sys.stderr, flush=True)

    for level in GRID_LEVELS:
        for d in DELTAS:
            for layout, framing in LAYOUTS:
                if layout == "bytes" and w == 1:
                    continue
                add(d, layout, framing, level)
    # the best pipelines (at level 3) get the other levels, --long and literals-only
    at3 = sorted((r for r in rows if r["level"] == 3), key=lambda r: r["size"])
    leaders, seen = [], set()
    for r in at3:
        key = (r["delta"], r["layout"], r["framing"])
        if key not in seen:
            seen.add(key)
            leaders.append(key)
        if len(leaders) == args.leaders:
            break
    for key in (("xor", "bytes", "1f"), ("zadd", "bytes", "1f")):  # nnpatch's current pipelines, always
        if key not in leaders:
            leaders.append(key)
    for d, layout, framing in leaders:
        for level in EXTRA_LEVELS:
            add(d, layout, framing, level)
        add(d, layout, framing, 19, "long")
        add(d, layout, framing, 1, "lit")
    bounds = {}
    for d in DELTAS:
        v = delta(n, o, d)
        bounds[d] = dict(bytes=100.0 * sum(h0_bytes(p) for p in planes(v, "bytes")) / raw if w > 1 else None,
                         bits=100.0 * h0_bits(v) / raw,
                         cond=100.0 * h_cond(v) / raw if w > 1 else None,
                         per_plane=[h0_bytes(p) / p.nbytes * 8 for p in planes(v, "bytes")] if w > 1 else None)
    return dict(pair=pair, width=w, changed_bytes=total, sample_bytes=raw, rows=rows, bounds=bounds, rel=rel)


def relative_change(n: np.ndarray, o: np.ndarray, w: int) -> dict:
    """How big the update is: quantiles of |new - old| / |old| over the sampled values."""
    if w == 4:
        a, b = n.view(np.float32).astype(np.float64), o.view(np.float32).astype(np.float64)
    elif w == 2:  # bf16: the top half of an fp32
        a = (n.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        b = (o.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        return {}
    ok = np.isfinite(a) & np.isfinite(b) & (b != 0)
    r = np.abs(a[ok] - b[ok]) / np.abs(b[ok])
    q = np.quantile(r, [0.1, 0.5, 0.9]) if r.size else [float("nan")] * 3
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]),
            "same": float(np.mean(n == o))}


# --- report -------------------------------------------------------------------

def _name(r: dict) -> str:
    pipe = [r["delta"]] if r["delta"] != "none" else []
    if r["layout"] != "-":
        pipe.append(f"{r['layout']}-planes" + ("/frame-per-plane" if r["framing"] == "pf" else ""))
    pipe.append({"": "zstd", "long": "zstd --long", "lit": "zstd literals-only"}[r["mode"]] +
                ("" if r["mode"] == "lit" else f" -{r['level']}"))
    return " + ".join(pipe)


def table(res: dict, markdown: bool, top: int) -> str:
    rows = sorted(res["rows"], key=lambda r: (r["size"], -r["mbs"]))
    head = f"{res['pair']}: {res['width']}-byte values, {res['changed_bytes']:,} B changed, sample {res['sample_bytes']:,} B"
    if res.get("rel"):
        r = res["rel"]
        head += (f"; |new-old|/|old| p10 {r['p10']:.2g}, median {r['median']:.2g}, p90 {r['p90']:.2g}; "
                 f"{100 * r['same']:.1f}% of sampled values unchanged")
    lines = []
    if markdown:
        lines += [f"**{head}**", "", "| # | pipeline | % of raw | encode MB/s |", "|---:|---|---:|---:|"]
        for i, r in enumerate(rows[:top], 1):
            lines.append(f"| {i} | {_name(r)} | {r['pct']:.2f} | {r['mbs']:.1f} |")
    else:
        lines.append(head)
        for i, r in enumerate(rows[:top], 1):
            lines.append(f"  {i:3}  {_name(r):58} {r['pct']:7.2f}%  {r['mbs']:8.1f} MB/s")
    # bounds
    bl = []
    for d, b in res["bounds"].items():
        s = f"{d}: H0 bits {b['bits']:.2f}%"
        if b["bytes"] is not None:
            s += f", H0 bytes {b['bytes']:.2f}% (bits/byte per plane, low..high: " + \
                 " ".join(f"{x:.2f}" for x in b["per_plane"]) + f"), H(byte | next byte up) {b['cond']:.2f}%"
        bl.append(s)
    if markdown:
        lines += ["", "Order-0 entropy bounds (% of raw):", ""] + [f"- {x}" for x in bl]
    else:
        lines += ["  order-0 entropy bounds (% of raw):"] + [f"    {x}" for x in bl]
    return "\n".join(lines)


def current_pipelines(res: dict) -> str:
    """nnpatch's candidate pipelines at each level, for the conclusion."""
    out = []
    for d, lay in (("xor", "bytes"), ("zadd", "bytes"), ("xor", "-"), ("none", "bytes"), ("none", "-")):
        rs = sorted((r for r in res["rows"] if r["delta"] == d and r["layout"] == lay and r["framing"] == "1f"
                     and r["mode"] == ""), key=lambda r: r["level"])
        if rs:
            out.append(f"{d}+{lay}: " + ", ".join(f"L{r['level']} {r['pct']:.2f}% @ {r['mbs']:.0f} MB/s" for r in rs))
    return "\n".join(out)


def conclusion(results: list[dict]) -> str:
    lines = []
    for res in results:
        rows = res["rows"]
        best = min(rows, key=lambda r: r["size"])
        fastish = [r for r in rows if r["mbs"] >= 50]
        best_fast = min(fastish, key=lambda r: r["size"]) if fastish else None
        lines.append(f"- {res['pair']} ({res['width']}-byte): smallest {_name(best)} = {best['pct']:.2f}% "
                     f"at {best['mbs']:.1f} MB/s" +
                     (f"; smallest at >= 50 MB/s: {_name(best_fast)} = {best_fast['pct']:.2f}% at "
                      f"{best_fast['mbs']:.0f} MB/s" if best_fast else ""))
        cur = current_pipelines(res)
        lines += ["    " + x for x in cur.splitlines()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="dense,dense-bf16,channel,dense@0.1",
                    help="models.py pairs; NAME@S (fp32 only) scales the update: old + S * (new - old)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sample-mb", type=float, default=8.0, help="cap on sampled new-value bytes per pair")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--leaders", type=int, default=4, help="pipelines that get the extra levels")
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("--out", default=os.path.join(REPO, "bench-out"))
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    results = []
    for p in args.pairs.split(","):
        base, _, scale = p.partition("@")
        if scale and base not in ("dense", "channel"):
            ap.error("NAME@SCALE works for the fp32 pairs dense and channel")
        old, new = models.get_pair(base, args.out, args.quick)
        results.append(study(p, old, new, args, float(scale) if scale else None))
        print(table(results[-1], False, args.top) + "\n", flush=True)
    print("Conclusion data:\n" + conclusion(results))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(table(r, True, args.top) for r in results) + "\n\nSummary:\n\n" + conclusion(results)
                    + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
