"""``explained_variance``: the one definition of an SAE's reconstruction quality in this package."""

from __future__ import annotations

from torch import Tensor


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the rows of ``x`` ``(N, d)`` (``FVU = 1 - EV``).

    Computed in the inputs' dtype. ``recipes.sae_eval`` streams the same quantity over batches with
    SAELens's ``ExplainedVarianceCalculator`` (float64 sums), for inputs too large to hold at once.
    """
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
