"""Qwen3.5-MoE in HookedTransformer: the Qwen3.5 hybrid stack with a shared-expert MoE in
every layer (:class:`~.components.SharedExpertMoE`: routed top-k experts with renormalised
softmax weights, plus a sigmoid-gated shared expert). Everything else is :mod:`.qwen3_5`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import QwenHookedConfig, expert_weights, gated_mlp_weights
from ._memory_layout import use_hf_memory_layout
from .components import HybridBlock, SharedExpertMoE
from .qwen3_5 import convert_hybrid, hybrid_config, supports_fold_ln
from .qwen3_moe import moe_fields

HF_ARCHITECTURES: tuple[str, ...] = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
__all__ = ["HF_ARCHITECTURES", "convert_state_dict", "hooked_config", "make_block", "supports_fold_ln"]


def hooked_config(hf_config) -> QwenHookedConfig:
    # Qwen3.5-MoE always renormalises the top-k weights
    return hybrid_config(hf_config, HF_ARCHITECTURES[0], **moe_fields(hf_config, norm_topk_prob=True))


def make_block(cfg: QwenHookedConfig, block_index: int) -> HybridBlock:
    return use_hf_memory_layout(HybridBlock(cfg, block_index, SharedExpertMoE(cfg)))


def shared_expert_moe_weights(mlp: nn.Module, prefix: str) -> dict[str, Tensor]:
    """HF ``Qwen3_5MoeSparseMoeBlock`` as :class:`SharedExpertMoE` (views)."""
    return {
        f"{prefix}.W_gate.weight": mlp.gate.weight,
        **expert_weights(mlp.experts, f"{prefix}.experts"),
        **gated_mlp_weights(mlp.shared_expert, f"{prefix}.shared_expert"),
        f"{prefix}.W_shared_gate": mlp.shared_expert_gate.weight.T,
    }


def convert_state_dict(hf_model: nn.Module, cfg: QwenHookedConfig) -> dict[str, Tensor]:
    return convert_hybrid(hf_model, cfg, shared_expert_moe_weights)
