"""``FeatureSubset``: a few features of one SAE, small enough to ship with a remote request.

Steering needs only decoder columns, and reading the pre-activation of a declared feature
needs only its encoder row; neither needs the other 32K-128K features. Top-k selection does
need the whole encoder, so a subset deliberately cannot ``encode_sparse``. The weights are in the
orientation of :class:`~qscope_plugins.sae.topk.QwenScopeSAE` (see :mod:`.protocol`), restricted
to the held features ``ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class FeatureSubset:
    """Encoder columns, decoder rows and biases of ``ids`` (all tensors on one device/dtype)."""

    ids: torch.Tensor
    """Feature ids, shape ``(n,)``."""
    W_enc: torch.Tensor
    """Encoder, ``(d_in, n)``: column i is the encoder row of feature ``ids[i]``."""
    W_dec: torch.Tensor
    """Decoder, ``(n, d_in)``: row i is the direction of feature ``ids[i]``."""
    b_enc: torch.Tensor
    """``(n,)``."""
    b_dec: torch.Tensor
    """``(d_in,)``."""
    d_sae: int
    """Width of the SAE the features come from."""
    k: int
    """That SAE's Top-k size."""
    metadata: dict = field(default_factory=dict)

    complete = False
    """A subset never holds every feature's encoder row, so it cannot Top-k encode."""

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    def _positions(self, features: Sequence[int] | torch.Tensor) -> list[int]:
        held = self.ids.tolist()
        position = {f: i for i, f in enumerate(held)}
        wanted = torch.as_tensor(features, dtype=torch.long).reshape(-1).tolist()
        missing = [f for f in wanted if f not in position]
        if missing:
            raise KeyError(f"feature {missing[0]} was not loaded (loaded: {held})")
        return [position[f] for f in wanted]

    def direction(self, feature: int) -> torch.Tensor:
        """Raw decoder column of ``feature`` (must be one of ``ids``)."""
        return self.W_dec[self._positions([feature])[0]]

    def directions(self, features: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Decoder columns of ``features`` (default: all loaded), ``(n, d_in)``."""
        if features is None:
            return self.W_dec
        return self.W_dec[self._positions(features)]

    def encoder_rows(self, features: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the encoder rows ``(n, d_in)`` and biases ``(n,)`` of ``features`` (each one of ``ids``)."""
        index = self._positions(features)
        return self.W_enc.detach()[:, index].T.clone(), self.b_enc.detach()[index].clone()

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``W_enc x + b_enc`` of the loaded features only, ``(..., n)``."""
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def encode_sparse(self, x: torch.Tensor):
        raise RuntimeError(
            "a FeatureSubset cannot compute Top-k codes: selecting the top k needs every encoder row. "
            "Load the full SAE (load_sae) or use encode_pre for these features."
        )

    encode = encode_sparse

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_i values_i W_dec[indices_i] + b_dec`` for codes that name only held features."""
        lookup = torch.full((self.d_sae,), -1, dtype=torch.long, device=self.ids.device)
        lookup[self.ids] = torch.arange(self.ids.numel(), device=self.ids.device)
        position = lookup[indices.to(lookup.device)]
        if (position < 0).any():
            raise KeyError(f"feature {int(indices.reshape(-1)[(position < 0).reshape(-1)][0])} was not loaded "
                           f"(loaded: {self.ids.tolist()})")
        rows = self.W_dec[position.to(self.W_dec.device)]
        return (values.to(rows.device, rows.dtype).unsqueeze(-1) * rows).sum(-2) + self.b_dec


def subset_from_rows(
    ids: torch.Tensor,
    W_enc_rows: torch.Tensor,
    W_dec_rows: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    metadata: dict,
    *,
    d_sae: int,
    k: int,
    device: torch.device,
    dtype: torch.dtype,
) -> FeatureSubset:
    """A subset from one row per feature for both weights, ``(n, d_in)`` (the encoder is kept as rows
    in memory and exposed as the ``(d_in, n)`` view)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, copy=True)

    return FeatureSubset(ids.clone(), move(W_enc_rows).T, move(W_dec_rows), move(b_enc), move(b_dec),
                         d_sae, k, metadata)
