"""``SparseAutoencoder``: what recipes need from an SAE, whether all of it or a few features.

Two types satisfy it: :class:`~qscope_plugins.sae.topk.QwenScopeSAE` (every feature, from
:func:`~qscope_plugins.sae.loading.load_sae`) and :class:`~qscope_plugins.sae.features.FeatureSubset`
(a few features, from :func:`~qscope_plugins.sae.loading.load_feature_subset`). Both hold their
weights in SAELens's orientation, one column / row per *held* feature:

=========  ================  ==========================================
``W_enc``  ``(d_in, n)``     column i: encoder row of the i-th held feature
``W_dec``  ``(n, d_in)``     row i: decoder column (direction) of that feature
``b_enc``  ``(n,)``
``b_dec``  ``(d_in,)``
=========  ================  ==========================================

with ``n = d_sae`` for the full SAE. Feature ids passed to the methods are the SAE's own ids
(``0 <= id < d_sae``), never positions. ``complete`` says whether every feature is held: Top-k
selection (``encode_sparse``) needs them all, so a subset refuses it, while ``encode_pre``,
``decode_sparse`` (of codes naming held features), ``directions`` and ``encoder_rows`` work on both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class SparseAutoencoder(Protocol):
    """The SAE interface recipes use (``isinstance(obj, SparseAutoencoder)`` checks the members)."""

    W_enc: Tensor
    W_dec: Tensor
    b_enc: Tensor
    b_dec: Tensor

    @property
    def d_in(self) -> int:
        """Width of the residual stream the SAE reads."""

    @property
    def d_sae(self) -> int:
        """Number of features of the SAE (also for a subset: the range of its ids)."""

    @property
    def k(self) -> int:
        """Features kept per token by Top-k."""

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Provenance (``sae_source``, ``sae_revision``, ``qwen_scope_group``, ...)."""

    @property
    def complete(self) -> bool:
        """True when every feature is held, so Top-k codes can be computed."""

    def encode_pre(self, x: Tensor) -> Tensor:
        """``W_enc x + b_enc`` of the held features, ``(..., n)``."""

    def encode_sparse(self, x: Tensor) -> Any:
        """Top-k codes (``TopKCodes``); full SAEs only."""

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """``sum_i values_i W_dec[indices_i] + b_dec``; ``indices`` are feature ids."""

    def directions(self, features: Sequence[int] | Tensor) -> Tensor:
        """Raw decoder columns of ``features``, ``(len(features), d_in)``."""

    def encoder_rows(self, features: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Detached copies of the encoder rows ``(len(features), d_in)`` and biases ``(len(features),)``."""
