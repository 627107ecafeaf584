"""Qwen3 (dense) in HookedTransformer.

TransformerLens already has the blocks (GQA, per-head q/k RMSNorm) and a weight converter
for ``Qwen3ForCausalLM``; what it lacks is loading from a local directory or an arbitrary
``hf_model`` and a context length taken from the config (it hard-codes 2048). So this module
only builds the config and reuses TransformerLens's converter.
"""

from __future__ import annotations

from transformer_lens.pretrained.weight_conversions.qwen3 import convert_qwen3_weights

from ._common import QwenHookedConfig, base_config

HF_ARCHITECTURES: tuple[str, ...] = ("Qwen3ForCausalLM",)


def hooked_config(hf_config) -> QwenHookedConfig:
    return base_config(hf_config, HF_ARCHITECTURES[0])


def convert_state_dict(hf_model, cfg):
    """TransformerLens's own converter: every tensor is a view of ``hf_model``'s parameters."""
    return convert_qwen3_weights(hf_model, cfg)
