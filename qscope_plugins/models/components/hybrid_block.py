"""One Qwen3.5 decoder layer as a TransformerLens block: pre-norm, token mixer, pre-norm, MLP.

The token mixer is Gated DeltaNet on ``linear_attention`` layers and output-gated attention on
``full_attention`` layers; both sit at ``attn`` so hook names stay TransformerLens's
(``blocks.{n}.attn.hook_q`` exists on every layer). ``hook_resid_post`` is the output of HF
decoder layer ``n``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .gated_attention import OutputGatedAttention
from .gated_deltanet import GatedDeltaNet
from .zero_centred_rms_norm import ZeroCentredRMSNorm


class HybridBlock(nn.Module):
    """Takes ``TransformerBlock.forward``'s arguments and exposes its standard hooks:
    ``hook_resid_pre``, ``ln1``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_in`` (when
    ``cfg.use_hook_mlp_in``), ``ln2``, ``hook_mlp_out``, ``hook_resid_post``.
    """

    def __init__(self, cfg, block_index: int, mlp: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.layer_type = cfg.hf_text_config["layer_types"][block_index]
        self.ln1 = ZeroCentredRMSNorm(cfg)
        self.ln2 = ZeroCentredRMSNorm(cfg)
        if self.layer_type == "linear_attention":
            self.attn: nn.Module = GatedDeltaNet(cfg, block_index)
        elif self.layer_type == "full_attention":
            self.attn = OutputGatedAttention(cfg, "global", block_index)
        else:
            raise ValueError(f"layer {block_index} has unsupported type {self.layer_type!r}")
        self.mlp = mlp
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        resid_pre: torch.Tensor,
        shortformer_pos_embed: torch.Tensor | None = None,
        past_kv_cache_entry=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.cfg.use_split_qkv_input or self.cfg.use_attn_in:
            raise NotImplementedError("use_split_qkv_input / use_attn_in are not supported for Qwen3.5 blocks")
        resid_pre = self.hook_resid_pre(resid_pre)
        normed = self.ln1(resid_pre)
        if isinstance(self.attn, GatedDeltaNet):
            attn_out = self.attn(normed, past_kv_cache_entry, attention_mask)
        else:
            attn_out = self.attn(
                normed, normed, normed, past_kv_cache_entry=past_kv_cache_entry, attention_mask=attention_mask
            )
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)
