"""``FeatureSubset``: a few features of one SAE, small enough to ship with a remote request.

Steering needs only decoder columns, and reading the pre-activation of a declared feature
needs only its encoder row; neither needs the other 32K-128K features. Top-k selection does
need the whole encoder, so a subset deliberately cannot ``encode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FeatureSubset:
    """Encoder rows, decoder columns and biases of ``ids`` (all tensors on one device/dtype)."""

    ids: torch.Tensor
    """Feature ids, shape ``(n,)``."""
    W_enc: torch.Tensor
    """Encoder rows, ``(n, d_model)``."""
    W_dec: torch.Tensor
    """Decoder columns as rows, ``(n, d_model)``: row i is the direction of feature ``ids[i]``."""
    b_enc: torch.Tensor
    """``(n,)``."""
    b_dec: torch.Tensor
    """``(d_model,)``."""
    metadata: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]

    def _position(self, feature: int) -> int:
        hits = (self.ids == feature).nonzero()
        if not hits.numel():
            raise KeyError(f"feature {feature} was not loaded (loaded: {self.ids.tolist()})")
        return int(hits[0, 0])

    def direction(self, feature: int) -> torch.Tensor:
        """Raw decoder column of ``feature`` (must be one of ``ids``)."""
        return self.W_dec[self._position(feature)]

    def directions(self, features: list[int] | None = None) -> torch.Tensor:
        """Decoder columns of ``features`` (default: all loaded), ``(n, d_model)``."""
        if features is None:
            return self.W_dec
        return self.W_dec[[self._position(f) for f in features]]

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``W_enc x + b_enc`` of the loaded features only, ``(..., n)``."""
        return x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "a FeatureSubset cannot compute Top-k codes: selecting the top k needs every encoder row. "
            "Load the full SAE (load_sae without features=) or use encode_pre for these features."
        )


def subset_from_rows(
    ids: torch.Tensor,
    W_enc_rows: torch.Tensor,
    W_dec_rows: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    metadata: dict,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> FeatureSubset:
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, copy=True)

    return FeatureSubset(ids.clone(), move(W_enc_rows), move(W_dec_rows), move(b_enc), move(b_dec), metadata)
