"""Miniature of the report's benchmark-redundancy analysis on the synthetic suite.

Footprints are the SAE features active at each item's last token at one layer (the report uses a
single layer; the demo fixes the last one in advance rather than picking the best). ``R_hat`` from the
footprints is compared with the performance-based ``R`` from the synthetic model panel's scores by
Spearman's rho, and the asymmetric footprint overlap shows the planted topic overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from ..backends import Backend
from ..recipes.capture import pooled_codes
from ..recipes.redundancy import feature_redundancy, overlap_matrix, performance_redundancy
from .benchmarks import Suite


@dataclass(frozen=True)
class RedundancyResult:
    layer: int
    names: tuple[str, ...]
    r_hat: tuple[float, ...]
    r: tuple[float, ...]
    footprint_sizes: tuple[int, ...]
    spearman: float
    overlap: np.ndarray  # [i, j] = share of benchmark i's footprint covered by benchmark j


def footprints(backend: Backend, sae, layer: int, items, *, batch_size: int = 64) -> list[np.ndarray]:
    """Active feature ids at each item's last token."""
    codes = pooled_codes(backend, {layer: sae}, list(items), mode="last", batch_size=batch_size)[layer]
    rows = [slice(codes.indptr[i], codes.indptr[i + 1]) for i in range(codes.shape[0])]
    return [codes.indices[row][codes.data[row] > 0] for row in rows]


def redundancy(backend: Backend, sae, layer: int, suite: Suite, *, n_subsets: int = 300) -> RedundancyResult:
    sets = {b.name: footprints(backend, sae, layer, b.items) for b in suite.benchmarks}
    names = tuple(sets)
    r_hat = tuple(feature_redundancy(sets[name]) for name in names)
    r = tuple(performance_redundancy(suite.scores[name], n_subsets=n_subsets).R for name in names)
    sizes = tuple(len(set().union(*map(set, sets[name]))) for name in names)
    return RedundancyResult(layer, names, r_hat, r, sizes, float(spearmanr(r, r_hat)[0]), overlap_matrix(sets))
