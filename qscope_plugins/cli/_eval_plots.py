"""PNG plots for ``qscope redundancy`` and ``qscope classify`` (matplotlib, headless, written atomically).

Each function takes ``path``: the PNG is written there, or with ``path=None`` returned as bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path | None):
    """Write the PNG to ``path`` atomically (no temp file survives a failure); ``None``: return its bytes."""
    from ._options import write_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue() if path is None else write_atomic(path, buffer.getvalue())


def heatmap(matrix: np.ndarray, rows: Sequence, cols: Sequence, path: Path, title: str, label: str) -> Path:
    """An annotated heatmap (overlaps, transfer F1, F1 per layer and K)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(cols), 1.0 + 0.5 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(matrix))))
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=7)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def curves(series: Mapping[str, np.ndarray], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """One line per series over x = 1..len (c_n curves), x as a fraction of the benchmark size."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ax.plot(np.arange(1, len(values) + 1) / len(values), values, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
    ax.legend(fontsize=7)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def scatter(
    x: Sequence[float], y: Sequence[float], labels: Sequence[str], path: Path, title: str, xlabel: str, ylabel: str
) -> Path:
    """Labelled points (R_hat against R)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(x, y)
    for xi, yi, name in zip(x, y, labels):
        ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
