"""nnpatch: small, exact, verifiable patches for neural-network weights.

    import nnpatch
    nnpatch.diff("v1.safetensors", "v2.safetensors", "v1-v2.nnpatch")
    nnpatch.apply("v1.safetensors", "v1-v2.nnpatch", "v2.safetensors")
    nnpatch.verify("v1-v2.nnpatch", base="v1.safetensors").ok

Importing nnpatch never imports torch.
"""

__version__ = "0.1.0"

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

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "MAGIC",
    "ApplyResult",
    "DiffResult",
    "Patch",
    "TensorChange",
    "VerifyReport",
    "VERIFY_MODES",
    "apply",
    "apply_chain",
    "apply_in_place",
    "diff",
    "hash_file",
    "model_digest",
    "read_patch",
    "recover",
    "require_verified",
    "revert",
    "verify",
    "BaseMismatchError",
    "IntegrityError",
    "MissingDependencyError",
    "NnpatchError",
    "NnpatchIOError",
    "PatchFormatError",
    "UnsupportedVersionError",
    "UsageError",
    "WeightsError",
]
