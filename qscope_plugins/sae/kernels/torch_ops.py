"""Plain-torch Top-k encoding and sparse decoding: any device, shape and float dtype.

These are the fallbacks (CPU, no Triton, odd shapes) and the baselines the benchmark compares
against. Every path that would build an ``N x something`` intermediate runs over row chunks
whose intermediate stays under ``chunk_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

#: Default bound on one chunk's intermediate (pre-activations, dense codes, gathered rows).
CHUNK_BYTES = 256 << 20
#: On CPU a GEMM of a few hundred rows already runs at full speed, so chunks can be smaller.
CPU_CHUNK_BYTES = 16 << 20


def default_chunk_bytes(device: torch.device) -> int:
    return CPU_CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES


def chunk_rows(bytes_per_row: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one chunk's intermediate stays under ``chunk_bytes`` (at least one row)."""
    return max(1, chunk_bytes // max(1, bytes_per_row))


def _map_rows(fn: Callable[[slice], torch.Tensor], n_rows: int, rows: int) -> torch.Tensor:
    if n_rows <= rows:
        return fn(slice(0, n_rows))
    return torch.cat([fn(slice(start, start + rows)) for start in range(0, n_rows, rows)])


def topk_encode(
    x: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor, k: int, chunk_bytes: int = CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x @ W_rows.T + b, k)`` (sorted) over 2-D ``x``, one pre-activation chunk at a time."""
    rows = chunk_rows(W_rows.shape[0] * W_rows.element_size(), chunk_bytes)
    values = torch.empty(x.shape[0], k, dtype=W_rows.dtype, device=x.device)
    indices = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        values[part], indices[part] = torch.addmm(b, x[part], W_rows.T).topk(k, dim=-1)
    return values, indices


def decode_dense(
    values: torch.Tensor, indices: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Scatter the codes into a dense chunk of ``rows x d_sae`` and run one GEMM (tensor cores on GPU)."""
    d_sae = W_rows.shape[0]

    def run(part: slice) -> torch.Tensor:
        dense = torch.zeros(values[part].shape[0], d_sae, dtype=W_rows.dtype, device=W_rows.device)
        return torch.addmm(b, dense.scatter_(1, indices[part].long(), values[part]), W_rows)

    return _map_rows(run, values.shape[0], chunk_rows(d_sae * W_rows.element_size(), chunk_bytes))


def decode_gather(
    values: torch.Tensor, indices: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Gather the ``k`` decoder rows of each token and contract them with its values (batched matmul)."""
    k, d_model = indices.shape[1], W_rows.shape[1]

    def run(part: slice) -> torch.Tensor:
        rows = W_rows[indices[part]]  # (rows, k, d_model)
        return torch.baddbmm(b.expand(rows.shape[0], 1, d_model), values[part].unsqueeze(1), rows).squeeze(1)

    return _map_rows(run, values.shape[0], chunk_rows(k * d_model * W_rows.element_size(), chunk_bytes))


def decode_embedding_bag(
    values: torch.Tensor, indices: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``F.embedding_bag`` with per-sample weights: a fused gather-and-sum with no intermediate."""
    return F.embedding_bag(indices, W_rows, per_sample_weights=values, mode="sum") + b


@lru_cache(maxsize=None)
def embedding_bag_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build implements weighted ``embedding_bag`` for ``dtype`` on ``device_type``.

    Older builds lack some half-precision CPU kernels; a one-row probe answers once per pair.
    """
    weight = torch.zeros(2, 1, dtype=dtype, device=device_type)
    try:
        decode_embedding_bag(torch.ones(1, 1, dtype=dtype, device=device_type),
                             torch.zeros(1, 1, dtype=torch.long, device=device_type), weight, weight[0])
    except (RuntimeError, NotImplementedError):
        return False
    return True
