"""Whether Triton can be used here: it is an optional extra (``qscope-plugins[gpu]``)."""

from __future__ import annotations

import os

try:
    import triton
except ImportError as error:  # the torch paths cover everything without it
    TRITON_VERSION: str | None = None
    _REASON = f"unavailable ({error})"
else:
    TRITON_VERSION = triton.__version__
    _REASON = f"available (triton {TRITON_VERSION})"

TRITON_AVAILABLE = TRITON_VERSION is not None


def triton_status() -> str:
    """One line for logs and benchmarks: ``"available (triton X.Y.Z)"`` or ``"unavailable (why)"``."""
    return _REASON


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (slowly), for tests without a GPU."""
    return TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
