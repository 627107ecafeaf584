"""Qwen's routed mixture of experts as a HookedTransformer MLP, and mixed dense/MoE blocks.

Shared by Qwen3-MoE and Qwen3.5-MoE: both route with softmax -> top-k -> (optionally)
renormalise, like TransformerLens's ``MoE``; this subclass keeps its parameter names (so
TransformerLens's ``fold_ln`` folds into the router and every expert) and adds the hooks an
analysis of routing needs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformer_lens.components import TransformerBlock
from transformer_lens.components.mlps.moe import MoE
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from ._attention import use_fused_attention
from ._memory_layout import use_hf_memory_layout


class RoutedMoE(MoE):
    """Top-k routed experts with hooks on every routing decision.

    Hooks (all ``[batch, pos, ...]``):

    - ``hook_router_logits``: router logits over all experts, ``[batch, pos, n_experts]``.
    - ``hook_expert_indices``: the chosen experts, ``[batch, pos, k]`` (int64).
    - ``hook_expert_weights``: the weights the chosen experts' outputs are multiplied by,
      after ``norm_topk_prob`` renormalisation, ``[batch, pos, k]``. (TransformerLens's own
      ``MoE`` puts the full softmax on this name; here it is what the layer really uses.)

    Editing a hook changes the routing: e.g. zeroing ``hook_expert_weights`` ablates experts.
    """

    def __init__(self, cfg: HookedTransformerConfig):
        # The experts are nn.Linear layers; skip their random init (weights are loaded, and
        # HookedTransformer.init_weights covers every W_* parameter when a model is built fresh).
        with torch.device("meta"):
            super().__init__(cfg)
        self.to_empty(device=torch.get_default_device())
        # TransformerLens creates the experts' nn.Linear layers in the default dtype, not cfg.dtype.
        self.to(cfg.dtype)
        self.hook_router_logits = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, pos, d_model = x.shape
        logits = self.hook_router_logits(self.W_gate(x))
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = self.hook_expert_indices(indices)
        weights = self.hook_expert_weights(weights.to(x.dtype))

        flat_x = x.reshape(-1, d_model)
        flat_indices = indices.reshape(-1, self.experts_per_token)
        flat_weights = weights.reshape(-1, self.experts_per_token)
        out = torch.zeros_like(flat_x)
        for expert in torch.unique(flat_indices).tolist():  # ascending, like HF: same sum order
            token, slot = torch.where(flat_indices == expert)
            expert_out = self.experts[expert](flat_x[token]) * flat_weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        return out.reshape(batch, pos, d_model)


def mixed_block(cfg: HookedTransformerConfig, block_index: int, moe: type[MoE] | None, d_mlp: int) -> TransformerBlock:
    """A TransformerLens block whose MLP is ``moe(cfg)``, or a dense ``GatedMLP`` of width
    ``d_mlp`` when ``moe`` is ``None`` (dense layers of an MoE stack).

    The block is built from a dense copy of ``cfg`` (TransformerLens picks the MLP from the
    config), then every submodule is pointed back at ``cfg`` itself, so runtime switches such
    as ``model.set_use_attn_result(True)`` reach this block too. Its attention is fused
    (:func:`~._attention.use_fused_attention`) and its weights are in HF's memory layout.
    """
    dense_cfg = dataclasses.replace(cfg, num_experts=None, experts_per_token=None, d_mlp=d_mlp)
    block = TransformerBlock(dense_cfg, block_index)
    if moe is not None:
        block.mlp = moe(cfg)
    for module in block.modules():
        if getattr(module, "cfg", None) is dense_cfg:
            module.cfg = cfg
    return use_hf_memory_layout(use_fused_attention(block))
