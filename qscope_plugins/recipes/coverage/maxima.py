"""Plumbing: texts -> per-example max activations of the target features, streamed through a backend."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from ...backends import Backend
from ..capture import pooled_batches, tokenize
from .report import Support
from .targets import FeatureKey

def example_maxima(
    backend: Backend,
    saes: Mapping[int, object],
    texts: Sequence[str],
    features: Sequence[FeatureKey],
    *,
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """For each batch of ``texts``, ``(B, F)`` max activations of ``features`` over each text's tokens.

    ``saes`` maps each needed layer to a full SAE (Top-k membership needs every encoder row). One
    forward pass per batch serves all layers; only the F target columns leave the sparse pooling.
    """
    features = [(int(l), int(f)) for l, f in features]
    if not features:
        raise ValueError("no target features given")
    layers = sorted({l for l, _ in features})
    missing = [l for l in layers if l not in saes]
    if missing:
        raise ValueError(f"no SAE given for layer {missing[0]}")
    for layer in layers:
        backend.check_sae(saes[layer], layer)
        d_sae = int(saes[layer].cfg.d_sae)
        bad = [f for l, f in features if l == layer and f >= d_sae]
        if bad:
            raise ValueError(f"feature {bad[0]} out of range for the layer-{layer} SAE (d_sae={d_sae})")
    columns = {l: [f for k, f in features if k == l] for l in layers}
    order = np.argsort([i for l in layers for i, (k, _) in enumerate(features) if k == l], kind="stable")
    rows = tokenize(backend, list(texts))
    for pooled in pooled_batches(backend, {l: saes[l] for l in layers}, rows, mode="max",
                                 skip_first_token=skip_first_token, batch_size=batch_size, progress=progress):
        block = np.concatenate([pooled[l][:, columns[l]].toarray() for l in layers], axis=1)
        yield block[:, order]


def collect_support(backend: Backend, saes: Mapping[int, object], texts: Sequence[str],
                    features: Sequence[FeatureKey], **kwargs) -> Support:
    """:class:`Support` of ``texts`` for ``features``, streamed batch by batch (see :func:`example_maxima`)."""
    support = Support.empty([(int(l), int(f)) for l, f in features])
    for block in example_maxima(backend, saes, texts, support.features, **kwargs):
        support.update(block)
    return support
