"""The safetensors dtype table, and the dtypes' names in numpy and torch.

nnpatch never interprets values as numbers: it compares, hashes, XORs and
copies bit patterns. Each dtype therefore maps to its width in bytes and to
the unsigned integer numpy type of that width, which can hold any dtype's
bit pattern exactly (bf16 and fp8 included, which numpy cannot represent).
"""

from __future__ import annotations

import numpy as np

#: name -> item size in bytes (the dtype names of the safetensors format).
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: The safetensors reference writer lays tensors out by this rank, highest
#: first, then by name (its Dtype enum's order); matching it makes
#: write_safetensors byte-identical to safetensors' own output.
WRITE_RANK: dict[str, int] = {name: i for i, name in enumerate([
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "C64", "F64", "I64", "U64",
])}

#: torch's name of a dtype (an attribute of the torch module) -> its safetensors name. The one
#: table of torch names: the checkpoint reader, the trainer's writer and its quantization-aware
#: phase all take it through :func:`torch_dtypes` (this module never imports torch).
TORCH_NAMES: dict[str, str] = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
    "complex64": "C64",
}


def torch_dtypes(torch) -> tuple[dict, dict[str, object]]:
    """(torch dtype -> safetensors name, safetensors name -> torch dtype) for the ``torch`` module
    given: the dtypes of :data:`TORCH_NAMES` that this torch has (older ones lack the fp8 types)."""
    to_st, from_st = {}, {}
    for tname, sname in TORCH_NAMES.items():
        td = getattr(torch, tname, None)
        if td is not None:
            to_st[td] = sname
            from_st[sname] = td
    return to_st, from_st


_UINT = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

#: numpy dtypes that write a given safetensors dtype (used by tests and the demo).
NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
}


def itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


def uint_of_width(width: int) -> np.dtype:
    """The little-endian unsigned integer dtype whose items are ``width`` bytes."""
    return _UINT[width]


def bits_view(buf, dtype: str) -> np.ndarray:
    """A flat view of raw tensor bytes as unsigned words of the dtype's width."""
    return np.frombuffer(buf, dtype=_UINT[ITEMSIZE[dtype]])
