"""Apply a patch: rebuild the target byte for byte from the base, proven by BLAKE3.

The modules, each importing only those before it:
``policy`` (verification modes, results) → ``plan`` (target layout, base
checks, the plan) → ``decode`` (sections into tensor bytes) → ``oscopy``
and ``engine`` (the one-pass, multi-threaded build) → ``targets``,
``directory``, ``journal``, ``inplace`` → ``api``.
"""

from .api import apply, apply_chain, apply_in_place, recover, replace_model, revert
from .policy import VERIFY_MODES, ApplyResult, Verify

__all__ = ["VERIFY_MODES", "ApplyResult", "Verify", "apply", "apply_chain", "apply_in_place", "recover", "replace_model", "revert"]
