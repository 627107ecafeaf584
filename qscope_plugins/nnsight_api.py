"""Build what an nnsight trace needs from a Qwen-Scope SAE, before the trace starts.

Everything here runs locally, outside the ``with`` block, and validates against the model
(layer range, ``d_model``) so a bad request fails before anything is sent. The results are
small torch-only objects from :mod:`qscope_plugins.remote`, whose functions run inside the
trace, locally or on NDIF::

    from qscope_plugins import load_sae, remote
    from qscope_plugins.nnsight_api import steering

    push = steering(model, 18, sae=sae, features={123: 8.0})   # one d_model vector
    with model.trace("The capital of France is", remote=True):
        remote.apply(model, [push])
        logits = model.lm_head.output.save()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .remote import EncoderRows, Layout, Steering, layout

__all__ = ["EncoderRows", "Layout", "Steering", "check_layers", "encoder_rows", "layout", "steering"]


def check_layers(model: Any, layers: Sequence[int]) -> list[int]:
    """``layers`` as ints, each checked against ``model``'s decoder layers (call before a remote trace)."""
    where = layout(model)
    return [where.check_layer(n) for n in layers]


def _feature_ids(features: Sequence[int] | Tensor) -> list[int]:
    ids = [int(f) for f in (features.tolist() if isinstance(features, Tensor) else features)]
    if not ids:
        raise ValueError("no features given")
    return ids


def steering(
    model: Any,
    layer: int,
    *,
    sae: Any = None,
    features: Mapping[int, float] | Sequence[int] | None = None,
    vector: Tensor | None = None,
    positions: Sequence[int] | Tensor | None = None,
    generated: bool = True,
) -> Steering:
    """A :class:`~qscope_plugins.remote.Steering` (an ``Intervention``) for ``model``'s layer ``layer``.

    Give either ``vector`` (``(d_model,)``) or ``sae`` with ``features``: a ``{feature: coefficient}``
    mapping, or feature ids (coefficient 1 each). ``sae`` may be a full ``QwenScopeSAE`` or a
    ``FeatureSubset`` (``load_feature_subset(source, layer, ids)``, which reads only those columns); the
    result holds one vector, ``sum_j c_j W_dec[j]``, never the SAE. See :class:`Steering` for
    ``positions`` and ``generated``.
    """
    where = layout(model)
    where.check_layer(layer)
    if (vector is None) == (sae is None):
        raise ValueError("give either `vector` or `sae` with `features`")
    if vector is None:
        if features is None:
            raise ValueError("`features` is required with `sae`: which features to steer")
        coefficients = dict(features) if isinstance(features, Mapping) else dict.fromkeys(_feature_ids(features), 1.0)
        ids = _feature_ids(list(coefficients))
        directions = sae.directions(ids).detach()
        weights = torch.tensor([float(coefficients[i]) for i in ids], dtype=directions.dtype, device=directions.device)
        vector = weights @ directions
    vector = vector.detach().reshape(-1).clone()  # a view would pickle its whole storage
    where.check_vector(vector, "the steering vector")
    return Steering(layer, vector, positions=positions, generated=generated)


def encoder_rows(model: Any, layer: int, sae: Any, features: Sequence[int] | None = None) -> EncoderRows:
    """Encoder rows of ``features`` at ``layer``, to read their pre-activations in a (remote) trace.

    ``sae`` is a ``FeatureSubset`` (``features`` defaults to all it holds) or a full
    ``QwenScopeSAE`` (``features`` required). Only these rows travel; Top-k selection needs the
    whole encoder, so for codes save the residual and call ``sae.encode_sparse`` after the trace.
    """
    where = layout(model)
    where.check_layer(layer)
    if not sae.complete:  # a FeatureSubset: features default to all it holds
        held = [int(i) for i in sae.ids.tolist()]
        ids = held if features is None else _feature_ids(features)
        missing = sorted(set(ids) - set(held))
        if missing:
            raise KeyError(f"features {missing} were not loaded in this subset (loaded: {held})")
    elif features is None:
        raise ValueError("`features` is required with a full SAE: which encoder rows to ship")
    else:
        ids = _feature_ids(features)
    weight, bias = sae.encoder_rows(ids)
    where.check_vector(weight, "the encoder")
    return EncoderRows(layer, torch.tensor(ids), weight, bias)
