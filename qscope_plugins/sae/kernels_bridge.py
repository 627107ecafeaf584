"""Temporary torch path for Top-k selection and sparse decode (replaced by sae.kernels.dispatch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_encode(x: torch.Tensor, W_rows: torch.Tensor, b_enc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    pre = torch.addmm(b_enc, x, W_rows.T)
    return pre.topk(k, dim=-1, sorted=True)


def decode(values: torch.Tensor, indices: torch.Tensor, W_dec_rows: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    if W_dec_rows.device.type == "cpu" and W_dec_rows.dtype != torch.float16:
        out = F.embedding_bag(indices, W_dec_rows, per_sample_weights=values, mode="sum")
    else:
        out = torch.einsum("nk,nkd->nd", values, W_dec_rows[indices])
    return out + b_dec
