"""Qwen3 (dense) in HookedTransformer.

TransformerLens already has the blocks (GQA, per-head q/k RMSNorm) and a weight converter
for ``Qwen3ForCausalLM``; what it lacks is loading from a local directory or an arbitrary
``hf_model`` and a context length taken from the config (it hard-codes 2048). So this module
builds the config, reuses TransformerLens's converter and block, and gives the block fused
attention (SDPA unless something hooks the pattern, see :mod:`._attention`) and weights in
HF's memory layout (:mod:`._memory_layout`).
"""

from __future__ import annotations

from transformer_lens.components import TransformerBlock
from transformer_lens.pretrained.weight_conversions.qwen3 import convert_qwen3_weights

from ._common import QwenHookedConfig, base_config
from ._attention import use_fused_attention
from ._memory_layout import use_hf_memory_layout

HF_ARCHITECTURES: tuple[str, ...] = ("Qwen3ForCausalLM",)


def hooked_config(hf_config) -> QwenHookedConfig:
    return base_config(hf_config, HF_ARCHITECTURES[0])


def make_block(cfg: QwenHookedConfig, block_index: int) -> TransformerBlock:
    return use_hf_memory_layout(use_fused_attention(TransformerBlock(cfg, block_index)))


def convert_state_dict(hf_model, cfg):
    """TransformerLens's own converter: every tensor is a view of ``hf_model``'s parameters."""
    return convert_qwen3_weights(hf_model, cfg)
