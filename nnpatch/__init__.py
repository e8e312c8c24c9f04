"""nnpatch: small, exact, verifiable patches for neural-network weights.

    import nnpatch
    nnpatch.diff("v1.safetensors", "v2.safetensors", "v1-v2.nnpatch")
    nnpatch.apply("v1.safetensors", "v1-v2.nnpatch", "v2.safetensors")
    nnpatch.verify("v1-v2.nnpatch", base="v1.safetensors").ok

Importing nnpatch never imports torch.  The names below load their modules on
first use (PEP 562), so that ``import nnpatch`` alone, and the CLI's light
commands, do not pay for numpy, zstandard and the applier.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

#: The public API, the one list of it: public name -> the submodule that defines it. ``__all__``
#: is made from it, and tests/test_cli_startup.py checks that the TYPE_CHECKING imports below
#: (for type checkers and IDEs only) name exactly these.
_EXPORTS = {
    "VERIFY_MODES": "applier", "ApplyResult": "applier", "apply": "applier", "apply_chain": "applier",
    "apply_in_place": "applier", "recover": "applier", "revert": "applier",
    "DiffResult": "differ", "TensorChange": "differ", "diff": "differ",
    "BaseMismatchError": "errors", "IntegrityError": "errors", "MissingDependencyError": "errors",
    "NnpatchError": "errors", "NnpatchIOError": "errors", "PatchFormatError": "errors",
    "UnsupportedVersionError": "errors", "UsageError": "errors", "WeightsError": "errors",
    "hash_file": "hashing", "model_digest": "hashing",
    "FORMAT_VERSION": "patchfile", "MAGIC": "patchfile", "Patch": "patchfile", "read_patch": "patchfile",
    "VerifyReport": "verifier", "require_verified": "verifier", "verify": "verifier",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ provides these
    from .applier import VERIFY_MODES, ApplyResult, apply, apply_chain, apply_in_place, recover, revert
    from .differ import DiffResult, TensorChange, diff
    from .errors import (
        BaseMismatchError,
        IntegrityError,
        MissingDependencyError,
        NnpatchError,
        NnpatchIOError,
        PatchFormatError,
        UnsupportedVersionError,
        UsageError,
        WeightsError,
    )
    from .hashing import hash_file, model_digest
    from .patchfile import FORMAT_VERSION, MAGIC, Patch, read_patch
    from .verifier import VerifyReport, require_verified, verify
