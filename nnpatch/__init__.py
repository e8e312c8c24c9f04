"""nnpatch: small, exact, verifiable patches for neural-network weights."""

__version__ = "0.1.0"
