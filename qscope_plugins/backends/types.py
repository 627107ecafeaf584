"""The values the :class:`~qscope_plugins.backends.base.Backend` interface passes around.

Padded token batches, the residuals captured from them, generations and decoding settings:
plain data, shared by every backend and recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Prompts = Sequence[str] | Sequence[Sequence[int]]
"""Texts, or already tokenised prompts (lists of token ids)."""


@dataclass(frozen=True)
class Batch:
    """Token ids of one padded batch and its attention mask (1 = real token)."""

    input_ids: Tensor
    attention_mask: Tensor
    start: int = 0
    """Index of this batch's first row among all inputs of the call."""

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(-1)

    @property
    def last_index(self) -> Tensor:
        """``(B,)`` column of each row's last real token, for left or right padding."""
        cols = torch.arange(self.attention_mask.shape[-1], device=self.attention_mask.device)
        return torch.where(self.attention_mask.bool(), cols, -1).max(-1).values


@dataclass
class ResidualBatch:
    """Residuals of one batch: ``hidden[layer]`` is ``(B, T, D)``, or ``(B, D)`` when ``last_token``."""

    batch: Batch
    hidden: dict[int, Tensor]
    last_token: bool = False

    @property
    def mask(self) -> Tensor:
        """``(B, T)`` bool, true at real tokens (right padding: pads are at the end)."""
        return self.batch.attention_mask.bool()

    def token_mask(self, skip_first: bool = False) -> Tensor:
        """The real-token mask, optionally without each row's first token (its norm is extreme)."""
        mask = self.mask
        if skip_first:
            mask = mask.clone()
            mask[:, 0] = False
        return mask

    def tokens(self, layer: int, skip_first: bool = False) -> Tensor:
        """``(N_real, D)`` residuals of the real tokens only: the input of every token statistic."""
        if self.last_token:
            return self.hidden[layer]
        return self.hidden[layer][self.token_mask(skip_first)]


@dataclass
class Generation:
    """One prompt's generation: ids of the prompt and of the new tokens only (EOS kept, pads dropped)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text}


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; the default is greedy, which every backend reproduces exactly."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
