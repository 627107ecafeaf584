"""HookedTransformer components for Qwen3.5's hybrid stack, one concept per module."""

from .gated_attention import OutputGatedAttention
from .gated_deltanet import GatedDeltaNet
from .hybrid_block import HybridBlock
from .shared_expert_moe import SharedExpertMoE
from .zero_centred_rms_norm import ZeroCentredRMSNorm

__all__ = ["GatedDeltaNet", "HybridBlock", "OutputGatedAttention", "SharedExpertMoE", "ZeroCentredRMSNorm"]
