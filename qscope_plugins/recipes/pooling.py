"""Pool per-token Top-k SAE codes into one sparse row per example, without a dense tokens x d_sae tensor.

Footprints (which features a sample activates) and classifiers (the max activation of each feature over
a text) both reduce ``(B, T, k)`` Top-k codes over tokens. Only the ``B * T * k`` non-zero entries are
touched, so a batch costs the same at d_sae = 32K or 128K.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def pool_codes(values, indices, d_sae: int, mask=None, reduce: str = "max") -> sp.csr_array:
    """``(B, d_sae)`` sparse rows from Top-k codes ``values``/``indices`` of shape ``(B, T, k)`` or ``(B, k)``.

    ``mask`` ``(B, T)`` (bool) selects the tokens to pool; ``None`` pools all of them. Only positive
    activations count (the model-card variant without ReLU can keep negative values, which never fire).
    ``reduce="max"`` gives the max activation over the pooled tokens; ``reduce="count"`` the number of
    pooled tokens at which each feature is active.
    """
    if reduce not in ("max", "count"):
        raise ValueError(f"reduce must be 'max' or 'count', got {reduce!r}")
    vals = _numpy(values).astype(np.float32, copy=False)
    idx = _numpy(indices).astype(np.int64, copy=False)
    if vals.shape != idx.shape or vals.ndim not in (2, 3):
        raise ValueError(f"values and indices must share a (B, T, k) or (B, k) shape, got {vals.shape} and {idx.shape}")
    if vals.ndim == 2:
        vals, idx = vals[:, None], idx[:, None]
    keep = vals > 0
    if mask is not None:
        token_mask = _numpy(mask).astype(bool)
        if token_mask.shape != vals.shape[:2]:
            raise ValueError(f"mask shape {token_mask.shape} does not match the codes' (B, T) = {vals.shape[:2]}")
        keep &= token_mask[:, :, None]
    if idx.size and (idx.min() < 0 or idx.max() >= d_sae):
        raise ValueError(f"feature indices must lie in [0, {d_sae})")
    rows = np.broadcast_to(np.arange(vals.shape[0])[:, None, None], vals.shape)[keep]
    keys = rows * d_sae + idx[keep]
    order = np.argsort(keys, kind="stable")
    keys, picked = keys[order], vals[keep][order]
    unique, starts, counts = np.unique(keys, return_index=True, return_counts=True)
    data = np.maximum.reduceat(picked, starts) if reduce == "max" and unique.size else counts.astype(np.float32)
    return sp.csr_array((data, (unique // d_sae, unique % d_sae)), shape=(vals.shape[0], d_sae), dtype=np.float32)
