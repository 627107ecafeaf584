"""Qwen3.5 (dense) in HookedTransformer: a hybrid of Gated DeltaNet and gated full attention.

What differs from Qwen3, and where it lives (``components/``): linear-attention layers
(``GatedDeltaNet``, calling transformers' conv and delta-rule kernels), full-attention layers
whose ``q_proj`` also emits an output gate (``OutputGatedAttention``), zero-centred RMSNorm
(``x_norm * (1 + w)``, ``ZeroCentredRMSNorm``) and partial rotary (the first
``partial_rotary_factor`` of each head, TransformerLens's ``rotary_dim``). Every layer is a
``HybridBlock``; ``hook_resid_post`` of block ``n`` is HF decoder layer ``n``'s output.

Not supported: TransformerLens's ``fold_ln`` (it cannot fold into these blocks' weights; the
integration loads unfolded, which leaves the residual stream as in HF), the stacked weight
properties (``model.W_Q`` ...) and ``use_attn_in`` / ``use_split_qkv_input``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformer_lens.components import GatedMLP

from ._common import (
    QwenHookedConfig,
    attention_weights,
    base_config,
    embed_unembed_weights,
    gated_mlp_weights,
    text_model,
)
from ._memory_layout import use_hf_memory_layout
from .components import HybridBlock

HF_ARCHITECTURES: tuple[str, ...] = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")


def hybrid_config(hf_config, architecture: str, **fields) -> QwenHookedConfig:
    """``base_config`` with what every Qwen3.5 stack needs; ``fields`` add or override."""
    if getattr(hf_config, "attention_bias", False):
        raise NotImplementedError("Qwen3.5 attention with attention_bias=True is not supported")
    d_head = hf_config.head_dim
    partial = (hf_config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    return base_config(
        hf_config,
        architecture,
        n_key_value_heads=hf_config.num_key_value_heads,  # always grouped: the gated attention is GQA
        rotary_dim=int(d_head * partial),
        **fields,
    )


def hooked_config(hf_config) -> QwenHookedConfig:
    return hybrid_config(hf_config, HF_ARCHITECTURES[0])


def make_block(cfg: QwenHookedConfig, block_index: int) -> HybridBlock:
    return use_hf_memory_layout(HybridBlock(cfg, block_index, GatedMLP(cfg)))


def supports_fold_ln(cfg: QwenHookedConfig) -> bool:
    """TransformerLens's ``fold_ln`` knows neither these blocks' weights nor the ``1 + w`` gain."""
    return False


def gated_attention_weights(attn: nn.Module, cfg: QwenHookedConfig, prefix: str) -> dict[str, Tensor]:
    """HF's ``q_proj`` holds, per head, the query rows then the gate rows: split them (views)."""
    rows = attn.q_proj.weight.view(cfg.n_heads, 2, cfg.d_head, cfg.d_model)
    # attention_weights reads q_proj as query rows only: hand it the query half, the rest as is.
    shared = {name: getattr(attn, name) for name in ("k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    query_only = SimpleNamespace(q_proj=SimpleNamespace(weight=rows[:, 0]), **shared)
    state = attention_weights(query_only, cfg, prefix)
    state[f"{prefix}.W_G"] = rows[:, 1].transpose(1, 2)
    state[f"{prefix}.b_G"] = torch.zeros_like(state[f"{prefix}.b_Q"])
    return state


def deltanet_weights(linear_attn: nn.Module, cfg: QwenHookedConfig, prefix: str) -> dict[str, Tensor]:
    """HF ``Qwen3_5GatedDeltaNet`` as :class:`~.components.GatedDeltaNet` (views)."""
    W_out = linear_attn.out_proj.weight  # (d_model, value_heads * value_dim)
    n_v = cfg.hf_text_config["linear_num_value_heads"]
    return {
        f"{prefix}.W_qkv": linear_attn.in_proj_qkv.weight.T,
        f"{prefix}.W_conv": linear_attn.conv1d.weight.squeeze(1),
        f"{prefix}.W_gate": linear_attn.in_proj_z.weight.T,
        f"{prefix}.W_beta": linear_attn.in_proj_b.weight.T,
        f"{prefix}.W_decay": linear_attn.in_proj_a.weight.T,
        f"{prefix}.A_log": linear_attn.A_log,
        f"{prefix}.dt_bias": linear_attn.dt_bias,
        f"{prefix}.norm.weight": linear_attn.norm.weight,
        f"{prefix}.W_O": W_out.view(cfg.d_model, n_v, -1).permute(1, 2, 0),
    }


def convert_hybrid(
    hf_model: nn.Module, cfg: QwenHookedConfig, mlp_weights: Callable[[nn.Module, str], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The state dict of a Qwen3.5 stack whose MLPs ``mlp_weights(hf_mlp, prefix)`` converts."""
    layers = text_model(hf_model).layers
    state = embed_unembed_weights(hf_model, cfg)
    # TransformerLens builds ln_final as a plain RMSNorm: give it the gain itself (1 + w).
    state["ln_final.w"] = 1.0 + state["ln_final.w"].float()
    for i in range(cfg.n_layers):
        layer, prefix = layers[i], f"blocks.{i}"
        state[f"{prefix}.ln1.w"] = layer.input_layernorm.weight
        state[f"{prefix}.ln2.w"] = layer.post_attention_layernorm.weight
        if cfg.hf_text_config["layer_types"][i] == "linear_attention":
            state.update(deltanet_weights(layer.linear_attn, cfg, f"{prefix}.attn"))
        else:
            state.update(gated_attention_weights(layer.self_attn, cfg, f"{prefix}.attn"))
        state.update(mlp_weights(layer.mlp, f"{prefix}.mlp"))
    return state


def convert_state_dict(hf_model: nn.Module, cfg: QwenHookedConfig) -> dict[str, Tensor]:
    return convert_hybrid(hf_model, cfg, gated_mlp_weights)
