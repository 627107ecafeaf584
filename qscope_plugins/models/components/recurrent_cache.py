"""Recurrent state for a linear-attention layer, kept on TransformerLens's cache entry.

``HookedTransformer.generate`` (or a user) builds a ``TransformerLensKeyValueCache`` with one
key/value entry per layer and hands each block its own entry. A linear-attention layer has no
keys or values; it needs the last inputs of its causal convolution and the delta-rule state.
That state rides on the layer's entry as one extra attribute, so it lives and dies with the
cache the caller owns, and the entry's keys stay empty (TransformerLens only reads them for
positional offsets, which rotary models do not use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

_ATTRIBUTE = "qscope_recurrent_state"


@dataclass
class RecurrentState:
    """Conv inputs ``[batch, channels, kernel]`` and delta-rule state ``[batch, value_heads,
    key_dim, value_dim]``; both ``None`` before the first token."""

    conv: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None


def recurrent_state(entry: TransformerLensKeyValueCacheEntry) -> RecurrentState:
    """The state stored on ``entry``, created empty on first use."""
    state = getattr(entry, _ATTRIBUTE, None)
    if state is None:
        state = RecurrentState()
        setattr(entry, _ATTRIBUTE, state)
    return state


def store(entry: TransformerLensKeyValueCacheEntry, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
    """Record the state after a forward pass, unless the cache is frozen (TL's meaning)."""
    if not entry.frozen:
        setattr(entry, _ATTRIBUTE, RecurrentState(conv, recurrent))
