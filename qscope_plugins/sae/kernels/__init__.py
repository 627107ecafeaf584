"""Fast exact Top-k encoding and sparse decoding for Top-k SAEs (see docs/topk.md).

Triton is optional (``pip install 'qscope-plugins[gpu]'``): without it, or off CUDA, every call
takes the plain torch path. :func:`triton_status` says which case applies.
"""

from ._triton import TRITON_AVAILABLE, triton_status
from .dispatch import (
    DECODE_TABLE,
    decode,
    decode_method,
    encode_backend,
    encode_screened,
    topk_encode,
    topk_last_dim,
)

__all__ = [
    "DECODE_TABLE",
    "TRITON_AVAILABLE",
    "decode",
    "decode_method",
    "encode_backend",
    "encode_screened",
    "topk_encode",
    "topk_last_dim",
    "triton_status",
]
