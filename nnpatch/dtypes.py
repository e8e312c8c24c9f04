"""The safetensors dtype table.

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
