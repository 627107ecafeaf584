"""Triton filter kernel for :func:`threshold.threshold_topk`: one read of the pre-activations.

Each program loads a ``BLOCK_M x BLOCK_N`` tile, compares it with the rows' thresholds and
appends the (rare, about ``k`` per row) survivors to their row's buffer, reserving slots with an
atomic increment of the row's counter. Slot order is therefore arbitrary; the merge sorts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch_2d, tile_configs

_CONFIGS = tile_configs(("BLOCK_M", "BLOCK_N"), [(1, 2048, 4), (2, 1024, 4), (4, 1024, 8), (4, 2048, 8), (8, 512, 4)])
#: Interpreter runs are sequential Python; big tiles mean few programs.
_INTERPRETER_BLOCK = {"BLOCK_M": 16, "BLOCK_N": 256}


@triton.jit
def _filter_kernel(
    pre_ptr, thresh_ptr, counts_ptr, cand_values_ptr, cand_indices_ptr,
    n_rows, width, stride_row,
    CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    inside = row_ok[:, None] & (cols[None, :] < width)
    values = tl.load(pre_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=inside)
    thresh = tl.load(thresh_ptr + rows, mask=row_ok)
    # Compare in fp32 (exact for every input dtype): the interpreter orders raw bf16 bit patterns.
    keep = inside & (values.to(tl.float32) >= thresh.to(tl.float32)[:, None])
    row_counters = counts_ptr + tl.broadcast_to(rows[:, None], (BLOCK_M, BLOCK_N))
    slots = tl.atomic_add(row_counters, 1, mask=keep, sem="relaxed")
    keep = keep & (slots < CAP)
    out = rows[:, None].to(tl.int64) * CAP + slots
    tl.store(cand_values_ptr + out, values, mask=keep)
    tl.store(cand_indices_ptr + out, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=keep)


_filter_tuned = triton.autotune(_CONFIGS, key=["width"], reset_to_zero=["counts_ptr"])(_filter_kernel)


def filter_candidates(
    pre: torch.Tensor, thresh: torch.Tensor, counts: torch.Tensor,
    cand_values: torch.Tensor, cand_indices: torch.Tensor,
) -> None:
    """The :data:`threshold.FilterFn` on Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if pre.stride(-1) != 1:
        pre = pre.contiguous()
    n_rows, width = pre.shape
    args = (pre, thresh.contiguous(), counts, cand_values, cand_indices, n_rows, width, pre.stride(0))
    launch_2d(_filter_kernel, _filter_tuned, (n_rows, width), ("BLOCK_M", "BLOCK_N"), _INTERPRETER_BLOCK,
              *args, CAP=cand_values.shape[1])
