"""Explained variance: the one definition of an SAE's reconstruction quality in this package.

``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over tokens (``FVU = 1 - EV``), in two forms:
:func:`explained_variance` for rows held at once, :class:`ExplainedVariance` streamed over batches
(what ``recipes.sae_eval`` uses). Torch only: importing this module does not import SAELens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Explained variance of the rows of ``x`` ``(N, d)``, computed in the inputs' dtype."""
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


class ExplainedVariance:
    """The same quantity streamed over batches: ``1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)``.

    The arithmetic of SAELens's ``ExplainedVarianceCalculator``: batch sums in at least float32,
    accumulated in float64 on the CPU (the variance is a difference of two large, close numbers).
    """

    def __init__(self) -> None:
        self.sum_x: Tensor | None = None
        self.sum_squared_norm = 0.0
        self.sum_squared_residual = 0.0
        self.num_samples = 0

    def add_batch(self, x_hat: Tensor, x: Tensor) -> None:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        batch_sum = x.sum(0).to("cpu", torch.float64)
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        self.sum_squared_norm += x.pow(2).sum().item()
        self.sum_squared_residual += (x - x_hat).pow(2).sum().item()
        self.num_samples += x.shape[0]

    def merge(self, other: ExplainedVariance) -> None:
        """Add ``other``'s batches after this one's (the same operations as adding them here)."""
        if other.sum_x is not None:
            self.sum_x = other.sum_x if self.sum_x is None else self.sum_x + other.sum_x
        self.sum_squared_norm += other.sum_squared_norm
        self.sum_squared_residual += other.sum_squared_residual
        self.num_samples += other.num_samples

    def compute(self) -> float:
        if self.num_samples == 0 or self.sum_x is None:
            return 0.0
        variance = self.sum_squared_norm / self.num_samples - (self.sum_x / self.num_samples).pow(2).sum().item()
        mse = self.sum_squared_residual / self.num_samples
        if variance < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / variance
