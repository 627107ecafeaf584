"""Pieces shared by the Qwen architecture modules: config base, HF module lookup, weight views.

Every converter here returns *views* of the HF parameters (transposes, reshapes, slices),
never copies, so building a HookedTransformer state dict costs no memory beyond the HF
model; the only new tensors are the zero biases TransformerLens expects, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

from ..remote import decoder_stack, final_norm, layout, unembedding


@dataclass
class QwenHookedConfig(HookedTransformerConfig):
    """``HookedTransformerConfig`` that also keeps the HF text config it was built from.

    TransformerLens's config has no field for per-layer facts (which layers are dense in an
    MoE stack, which use linear attention, the shared-expert width); blocks read them from
    ``hf_text_config`` (a plain dict, so the config stays copyable and printable).
    """

    hf_text_config: dict[str, Any] = field(default_factory=dict)


def rope_theta(hf_config) -> float:
    """RoPE base frequency; refuses RoPE scaling types a plain rotary layer would get wrong."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"RoPE type {rope_type!r} is not supported in HookedTransformer")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def config_dict(hf_config) -> dict[str, Any]:
    """``hf_config.to_dict()`` plus its attribute aliases (``to_dict`` stores Qwen3-MoE's
    ``num_experts`` as ``num_local_experts``; the dict answers to both names)."""
    aliases = getattr(hf_config, "attribute_map", {}) or {}
    return {**hf_config.to_dict(), **{alias: getattr(hf_config, alias) for alias in aliases}}


def base_config(hf_config, architecture: str, **fields: Any) -> QwenHookedConfig:
    """The fields every Qwen3 / Qwen3.5 text model shares; ``fields`` add or override.

    ``n_ctx`` is the model's own ``max_position_embeddings``. Qwen tokenizers add no BOS, so
    ``default_prepend_bos`` is ``False``: the residual stream matches HF on the same ids.
    Only fields every published text config has are read here: ``intermediate_size`` (absent
    from Qwen3.5-MoE configs) is read only when ``fields`` gives no ``d_mlp``.
    """
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    values: dict[str, Any] = dict(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        d_mlp=fields["d_mlp"] if "d_mlp" in fields else hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_base=rope_theta(hf_config),
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        use_qk_norm=True,
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        initializer_range=hf_config.initializer_range,
        original_architecture=architecture,
        init_weights=False,
        hf_text_config=config_dict(hf_config),
    )
    values.update(fields)
    return QwenHookedConfig(**values)


def text_model(hf_model: nn.Module) -> nn.Module:
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``) of a text or multimodal model,
    found by the package's one layout resolver (:func:`qscope_plugins.remote.layout`)."""
    return decoder_stack(hf_model)


def _zeros(*shape: int, like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def embed_unembed_weights(hf_model: nn.Module, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
    """Token embedding, final norm and unembedding (``lm_head``, tied or not)."""
    where = layout(hf_model)
    W_U = unembedding(hf_model).weight
    return {
        "embed.W_E": decoder_stack(hf_model, where).embed_tokens.weight,
        "ln_final.w": final_norm(hf_model, where).weight,
        "unembed.W_U": W_U.T,
        "unembed.b_U": _zeros(W_U.shape[0], like=W_U),
    }


def attention_weights(attn: nn.Module, cfg: HookedTransformerConfig, prefix: str) -> dict[str, Tensor]:
    """Qwen3 attention (per-head q/k RMSNorm, grouped KV heads) as ``prefix.W_Q`` etc."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = "_" if cfg.n_key_value_heads else ""  # GroupedQueryAttention stores _W_K / _W_V
    d_model, d_head = cfg.d_model, cfg.d_head

    def heads_in(weight: Tensor, n: int) -> Tensor:  # (n*h, m) -> (n, m, h), a view
        return weight.view(n, d_head, d_model).transpose(1, 2)

    W_O = attn.o_proj.weight
    return {
        f"{prefix}.W_Q": heads_in(attn.q_proj.weight, cfg.n_heads),
        f"{prefix}.{kv}W_K": heads_in(attn.k_proj.weight, n_kv),
        f"{prefix}.{kv}W_V": heads_in(attn.v_proj.weight, n_kv),
        f"{prefix}.W_O": W_O.view(d_model, cfg.n_heads, d_head).permute(1, 2, 0),
        f"{prefix}.b_Q": _zeros(cfg.n_heads, d_head, like=W_O),
        f"{prefix}.{kv}b_K": _zeros(n_kv, d_head, like=W_O),
        f"{prefix}.{kv}b_V": _zeros(n_kv, d_head, like=W_O),
        f"{prefix}.b_O": _zeros(d_model, like=W_O),
        f"{prefix}.q_norm.w": attn.q_norm.weight,
        f"{prefix}.k_norm.w": attn.k_norm.weight,
    }


def gated_mlp_weights(mlp: nn.Module, prefix: str) -> dict[str, Tensor]:
    """A dense SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``) as a TL ``GatedMLP``."""
    W_out = mlp.down_proj.weight
    return {
        f"{prefix}.W_in": mlp.up_proj.weight.T,
        f"{prefix}.W_gate": mlp.gate_proj.weight.T,
        f"{prefix}.W_out": W_out.T,
        f"{prefix}.b_in": _zeros(W_out.shape[1], like=W_out),
        f"{prefix}.b_out": _zeros(W_out.shape[0], like=W_out),
    }


def expert_weights(experts: nn.Module, prefix: str) -> dict[str, Tensor]:
    """Fused HF experts (``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I)) as TL experts.

    TL's ``MoEGatedMLP`` holds ``nn.Linear`` layers, so the keys end in ``.weight`` and keep
    HF's (out, in) layout: each is a slice of the fused tensor, not a copy.
    """
    gate_up, down = experts.gate_up_proj, experts.down_proj
    d_expert = down.shape[-1]
    out: dict[str, Tensor] = {}
    for e in range(gate_up.shape[0]):
        out[f"{prefix}.{e}.W_gate.weight"] = gate_up[e, :d_expert]
        out[f"{prefix}.{e}.W_in.weight"] = gate_up[e, d_expert:]
        out[f"{prefix}.{e}.W_out.weight"] = down[e]
    return out
