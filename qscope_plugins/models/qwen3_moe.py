"""Qwen3-MoE in HookedTransformer: Qwen3 attention plus routed experts, some layers dense.

Routing is softmax -> top-k -> renormalise when ``norm_topk_prob`` (see
:class:`~qscope_plugins.models._moe.RoutedMoE` for its hooks). A layer is sparse exactly as
in ``Qwen3MoeDecoderLayer``: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step
== 0``; the other layers hold a dense SwiGLU MLP of width ``intermediate_size``.
"""

from __future__ import annotations

from torch import Tensor

from ._common import (
    QwenHookedConfig,
    attention_weights,
    base_config,
    embed_unembed_weights,
    expert_weights,
    gated_mlp_weights,
    text_model,
)
from ._moe import RoutedMoE, mixed_block

HF_ARCHITECTURES: tuple[str, ...] = ("Qwen3MoeForCausalLM",)


def is_sparse_layer(hf_text_config: dict, layer: int) -> bool:
    """Whether HF builds layer ``layer`` with experts (same rule as ``Qwen3MoeDecoderLayer``)."""
    return (
        layer not in (hf_text_config.get("mlp_only_layers") or [])
        and hf_text_config.get("num_experts", 0) > 0
        and (layer + 1) % hf_text_config.get("decoder_sparse_step", 1) == 0
    )


def moe_fields(hf_config, norm_topk_prob: bool) -> dict:
    """The MoE fields of a hooked config: expert width, experts, experts per token, top-k renormalisation."""
    return dict(
        d_mlp=hf_config.moe_intermediate_size,
        num_experts=hf_config.num_experts,
        experts_per_token=hf_config.num_experts_per_tok,
        norm_topk_prob=norm_topk_prob,
    )


def hooked_config(hf_config) -> QwenHookedConfig:
    return base_config(hf_config, HF_ARCHITECTURES[0], **moe_fields(hf_config, hf_config.norm_topk_prob))


def make_block(cfg: QwenHookedConfig, block_index: int):
    hf = cfg.hf_text_config
    if is_sparse_layer(hf, block_index):
        return mixed_block(cfg, block_index, RoutedMoE, cfg.d_mlp)
    return mixed_block(cfg, block_index, None, hf["intermediate_size"])


def supports_fold_ln(cfg: QwenHookedConfig) -> bool:
    """TransformerLens folds ``ln2`` of an MoE config only into experts, so dense layers block it."""
    return all(is_sparse_layer(cfg.hf_text_config, i) for i in range(cfg.n_layers))


def convert_state_dict(hf_model, cfg: QwenHookedConfig) -> dict[str, Tensor]:
    """Views of the HF weights; experts become per-expert slices of the fused tensors."""
    layers = text_model(hf_model).layers
    state = embed_unembed_weights(hf_model, cfg)
    for i in range(cfg.n_layers):
        layer, prefix = layers[i], f"blocks.{i}"
        state[f"{prefix}.ln1.w"] = layer.input_layernorm.weight
        state[f"{prefix}.ln2.w"] = layer.post_attention_layernorm.weight
        state.update(attention_weights(layer.self_attn, cfg, f"{prefix}.attn"))
        if is_sparse_layer(cfg.hf_text_config, i):
            state[f"{prefix}.mlp.W_gate.weight"] = layer.mlp.gate.weight
            state.update(expert_weights(layer.mlp.experts, f"{prefix}.mlp.experts"))
        else:
            state.update(gated_mlp_weights(layer.mlp, f"{prefix}.mlp"))
    return state
