"""Exact Top-k by threshold filtering: the algorithm, in torch, around one pluggable filter kernel.

``torch.topk`` over an ``N x d_sae`` matrix makes several radix passes over every row. Here each
row is read twice at memory speed instead, and the expensive selection runs on ~``2k`` values:

1. ``t`` = the k-th largest of the row's *group maxima* (the row cut into ``groups`` equal
   slices). Those maxima are ``groups >= k`` entries of the row at distinct positions, so
   ``t <= T_k``, the row's true k-th largest value.
2. A filter kernel appends every entry ``>= t`` (value and column) to a per-row buffer of
   ``cap`` slots and counts them. Every true top-k entry is ``>= T_k >= t``, so it is kept.
3. ``torch.topk`` over the buffer returns exactly the row's top-k (ties aside) whenever
   ``k <= count <= cap``. Rows outside that range (more than ``cap`` entries ``>= t``, or NaNs)
   are recomputed with plain ``torch.topk``, so the result is exact for every input.

With ``groups = 8k`` a row keeps about ``k + k/16`` entries, far below ``cap = 2k + 32``, so the
fallback almost never runs; it is the exactness guarantee, not a fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``filter_fn(pre, thresh, counts, cand_values, cand_indices)``: append every ``pre[r, j] >= thresh[r]``
#: to row ``r`` of the candidate buffers (slot = previous ``counts[r]``; slots past ``cap`` dropped).
FilterFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

#: Rows of pre-activations for a row selection (a ``slice`` or a LongTensor of row ids).
PreRows = Callable[[slice | torch.Tensor], torch.Tensor]

#: Each group must hold at least this many columns, or the threshold saves nothing over ``torch.topk``.
MIN_GROUP = 8


@dataclass(frozen=True)
class SelectPlan:
    """How one width is filtered: ``groups`` slices for the threshold, ``cap`` buffer slots per row."""

    groups: int
    cap: int


def plan_selection(width: int, k: int) -> SelectPlan | None:
    """The plan for rows of ``width`` entries, or None when the width is too small to gain anything."""
    groups = 1 << max(0, (8 * k - 1).bit_length())  # next power of two >= 8k
    if k < 1 or width < groups * MIN_GROUP:
        return None
    return SelectPlan(groups=groups, cap=2 * k + 32)


def group_threshold(pre: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """Per row, the k-th largest of the maxima of ``groups`` equal column slices: a lower bound on ``T_k``.

    Columns past ``groups * (width // groups)`` belong to no group; leaving them out keeps the
    bound valid (the maxima are still distinct entries of the row).
    """
    size = pre.shape[-1] // groups
    maxima = pre[:, : groups * size].unflatten(-1, (groups, size)).amax(-1)
    return maxima.topk(k, dim=-1, sorted=False).values.amin(-1)


def threshold_topk(
    pre_rows: PreRows,
    n_rows: int,
    width: int,
    k: int,
    plan: SelectPlan,
    filter_fn: FilterFn,
    *,
    chunk_rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (sorted, like ``torch.topk``) of every row of the ``n_rows x width`` matrix given by ``pre_rows``.

    Rows are materialised ``chunk_rows`` at a time, so the extra memory is one chunk of
    pre-activations plus ``n_rows x cap`` candidates.
    """
    cand_values = torch.full((n_rows, plan.cap), float("-inf"), dtype=dtype, device=device)
    cand_indices = torch.zeros((n_rows, plan.cap), dtype=torch.int32, device=device)
    counts = torch.zeros(n_rows, dtype=torch.int32, device=device)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        pre = pre_rows(rows)
        filter_fn(pre, group_threshold(pre, k, plan.groups), counts[rows], cand_values[rows], cand_indices[rows])
    values, slots = cand_values.topk(k, dim=-1)
    indices = cand_indices.gather(-1, slots).long()
    redo = ((counts < k) | (counts > plan.cap)).nonzero().squeeze(-1)
    if redo.numel():
        values[redo], indices[redo] = pre_rows(redo).topk(k, dim=-1)
    return values, indices
