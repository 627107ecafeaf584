"""RMSNorm whose stored weight is an offset from one: ``x_norm * (1 + w)``.

Qwen3.5 stores its norm weights this way (initialised at zero). Keeping the stored value, rather
than adding one at load time, means a state dict round-trips to and from HF unchanged and the
product is formed in fp32 exactly as HF does before casting back.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.components import RMSNorm


class ZeroCentredRMSNorm(RMSNorm):
    """TransformerLens ``RMSNorm`` (same ``hook_scale`` / ``hook_normalized``) with a ``1 + w`` gain."""

    def __init__(self, cfg, length: int | None = None):
        super().__init__(cfg, length)
        self.w = nn.Parameter(torch.zeros(self.length, dtype=self.cfg.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(x32 / scale)
        return (normalized * (1.0 + self.w.float())).to(x.dtype)
