"""Shared setup for the benchmarks: a random Qwen3 of a chosen size, built locally."""

from __future__ import annotations

import torch


def random_qwen3(hidden: int, layers: int, device: torch.device, max_positions: int = 512):
    """A perturbed random ``Qwen3ForCausalLM`` (64-dim heads, GQA) and the offline tiny tokenizer."""
    import transformers

    from qscope_plugins.testing.tiny_models import perturb_, tiny_config, tiny_tokenizer

    config = tiny_config(
        "Qwen3ForCausalLM",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        intermediate_size=3 * hidden,
        max_position_embeddings=max(512, max_positions),
    )
    model = perturb_(transformers.AutoModelForCausalLM.from_config(config)).eval().to(device)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = config.max_position_embeddings
    return model, tokenizer
