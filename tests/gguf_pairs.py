"""Real GGUF files for the tests, written by gguf-py's GGUFWriter (the llama.cpp project's writer).

``make_model`` writes a small model with a tensor of each kind nnpatch must carry exactly: F32, F16,
BF16, I32, Q8_0, Q4_0 (quantized by gguf.quants) and Q4_K (its blocks written as raw bytes: gguf-py
quantizes only some types), metadata of every KV type including arrays, at a given alignment.
``variant`` makes the pairs: some rows changed, every weight moved, a tensor added or removed (a KV
changed, a tensor re-quantized: ``write``'s ``kv`` and ``types``).
"""

from __future__ import annotations

import numpy as np

gguf = __import__("pytest").importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "token_embd.weight": rng.standard_normal((64, 96), dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((48, 64), dtype=np.float32),
        "blk.0.attn_k.weight": rng.standard_normal((40, 64), dtype=np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((32, 256), dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(64, dtype=np.float32),
        "blk.0.ffn_down.weight": rng.standard_normal((16, 64), dtype=np.float32),
        "blk.0.pos.weight": rng.integers(-1000, 1000, (8, 4), dtype=np.int32).astype(np.float32),
        "blk.0.bf.weight": rng.standard_normal((12, 32), dtype=np.float32),
    }


#: name -> how it is stored
TYPES = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.F16,
         "blk.0.ffn_up.weight": Q.Q4_K, "blk.0.attn_norm.weight": Q.F32, "blk.0.ffn_down.weight": Q.F32,
         "blk.0.pos.weight": Q.I32, "blk.0.bf.weight": Q.BF16}


def _stored(name: str, w: np.ndarray, types: dict) -> tuple[np.ndarray, Q]:
    t = types[name]
    if t == Q.F32:
        return w, t
    if t == Q.F16:
        return w.astype(np.float16), t
    if t == Q.I32:
        return w.astype(np.int32), t
    if t == Q.BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16), t
    if t == Q.Q4_K:
        # gguf-py cannot quantize K-quants: blocks of 144 bytes made from the weights' bits, as raw bytes
        rows = w.shape[0]
        per_row = w.shape[1] // 256 * 144
        raw = np.frombuffer(w.tobytes(), dtype=np.uint8)[: rows * per_row].reshape(rows, per_row).copy()
        return raw, t
    return quants.quantize(w, t), t


def write(path, weights: dict[str, np.ndarray], *, kv: dict | None = None, alignment: int | None = None,
          types: dict | None = None) -> None:
    """A GGUF file of ``weights``, stored as TYPES says (``types`` overrides some)."""
    types = {**TYPES, "blk.0.extra.weight": Q.Q8_0, **(types or {})}
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -3)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1.25)
    w.add_bool("t.bool", True)
    w.add_int64("t.i64", -1 << 40)
    w.add_array("t.strings", ["a", "bc", "déf"])
    w.add_array("t.ints", [1, 2, 3])
    for k, v in (kv or {}).items():
        w.add_string(k, v)
    for name, arr in weights.items():
        data, t = _stored(name, arr, types)
        if t == Q.BF16:
            w.add_tensor(name, data, raw_dtype=t)
        elif t in (Q.F32, Q.F16, Q.I32):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=quants.quant_shape_to_byte_shape(arr.shape, t)
                         if t != Q.Q4_K else data.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_model(path, seed: int = 0, **kw) -> dict[str, np.ndarray]:
    weights = _weights(seed)
    write(path, weights, **kw)
    return weights


def variant(weights: dict[str, np.ndarray], kind: str, seed: int = 1) -> dict[str, np.ndarray]:
    """A fine-tune of ``weights``: ``rows`` changes 10 % of each matrix's rows, ``dense`` moves every
    weight a little, ``added`` adds a tensor; the weights are copied."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in weights.items()}
    if kind == "rows":
        for k, v in out.items():
            if v.ndim == 2:
                pick = rng.choice(v.shape[0], max(1, v.shape[0] // 10), replace=False)
                v[pick] += rng.standard_normal((len(pick), v.shape[1]), dtype=np.float32) * 0.5
    elif kind == "dense":
        for k, v in out.items():
            v += rng.standard_normal(v.shape, dtype=np.float32) * 0.01
    elif kind == "added":
        out["blk.0.extra.weight"] = rng.standard_normal((8, 32), dtype=np.float32)
    elif kind == "removed":
        del out["blk.0.pos.weight"]
    return out
