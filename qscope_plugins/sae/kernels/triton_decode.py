"""Triton sparse decode: ``x_hat = sum_i values_i W_dec_rows[indices_i] + b_dec`` in one pass.

Each program owns a ``BLOCK_M x BLOCK_D`` tile of the output and, for each of the ``k`` codes,
gathers the matching ``BLOCK_D`` slice of every row's decoder row, accumulating in fp32. Nothing
``N x d_sae`` is built and each decoder slice is read once per (token, code); zero codes (ReLU)
skip their read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch_2d, tile_configs

_CONFIGS = tile_configs(("BLOCK_M", "BLOCK_D"), [(8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8)])
_INTERPRETER_BLOCK = {"BLOCK_M": 16, "BLOCK_D": 64}


@triton.jit
def _decode_kernel(
    values_ptr, indices_ptr, w_ptr, bias_ptr, out_ptr,
    n_rows, d_model, n_codes, stride_w_row, stride_w_col,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d_model
    codes = rows.to(tl.int64) * n_codes
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for i in range(n_codes):
        coef = tl.load(values_ptr + codes + i, mask=row_ok, other=0.0).to(tl.float32)
        feature = tl.load(indices_ptr + codes + i, mask=row_ok, other=0).to(tl.int64)
        live = (row_ok & (coef != 0.0))[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + feature[:, None] * stride_w_row + cols[None, :] * stride_w_col, mask=live, other=0.0)
        acc += coef[:, None] * w.to(tl.float32)
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * d_model + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_decode_tuned = triton.autotune(_CONFIGS, key=["d_model", "n_codes"])(_decode_kernel)


def decode_fused(values: torch.Tensor, indices: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sparse decode on Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``); output in ``W_rows.dtype``."""
    values, indices, b = values.contiguous(), indices.contiguous(), b.contiguous()
    n_rows, n_codes = values.shape
    d_model = W_rows.shape[1]
    out = torch.empty(n_rows, d_model, dtype=W_rows.dtype, device=W_rows.device)
    args = (values, indices, W_rows, b, out, n_rows, d_model, n_codes, W_rows.stride(0), W_rows.stride(1))
    launch_2d(_decode_kernel, _decode_tuned, (n_rows, d_model), ("BLOCK_M", "BLOCK_D"), _INTERPRETER_BLOCK, *args)
    return out
