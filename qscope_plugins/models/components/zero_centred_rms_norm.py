"""RMSNorm whose stored weight is an offset from one: ``x_norm * (1 + w)``.

Qwen3.5 stores its norm weights this way (initialised at zero). Keeping the stored value, rather
than adding one at load time, keeps the weight exact in bf16 (``1 + w`` is not representable
there) and lets the product be formed in fp32 exactly as HF does before casting back.
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
        variance = x32.pow(2).mean(-1, keepdim=True) + self.eps
        divisor = variance.sqrt()
        scale = self.hook_scale(divisor)
        # HF multiplies by rsqrt; dividing by the sqrt differs in the last bit, and the chunked
        # delta rule amplifies that, so the hooked divisor is used only when a hook replaced it.
        inverse = torch.rsqrt(variance) if scale is divisor else scale.reciprocal()
        normalized = self.hook_normalized(x32 * inverse)
        return (normalized * (1.0 + self.w.float())).to(x.dtype)
