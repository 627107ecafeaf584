"""Tiny random-weight Qwen3 / Qwen3.5 models and checkpoints for offline tests.

Public API (what other test modules import):

- ``ARCHITECTURES``: the four text architectures, HF class names.
- ``tiny_config(arch, **overrides)``: a transformers config, hidden size 64, 4 layers.
- ``tiny_model(arch, seed=0, **overrides)``: that model in fp32 eval mode, every weight
  perturbed from its init value (norm weights included, see ``perturb_``), reproducible
  from ``seed``. ``max_position_embeddings`` is ``MAX_POSITIONS`` (512, not 2048).
- ``tiny_tokenizer()``: a byte-level BPE tokenizer built locally (no download) that
  round-trips any text; its ids fit every tiny config's vocabulary.
- ``save_checkpoint(model, directory, multimodal=False, tokenizer=None, config_json=None)``:
  a local checkpoint directory loadable with ``from_pretrained``. With ``multimodal=True`` a
  Qwen3.5 (MoE) model is written in the published layout: ``architectures`` =
  ``Qwen3_5(Moe)ForConditionalGeneration``, text weights under ``model.language_model.*``,
  plus a tiny vision tower under ``model.visual.*``. ``config_json`` replaces the written
  ``config.json`` (how :mod:`.published_configs` keeps a published field set exactly).
- ``hf_layer_outputs(model, ids)``: HF logits and the output of every decoder layer (what
  ``blocks.{n}.hook_resid_post`` must equal), taken with forward hooks.
- ``hf_generate_steered(model, ids, layer, vector, max_new_tokens, use_cache)``: HF greedy
  generation with ``vector`` added to the output of decoder layer ``layer``.
- ``tiny_topk_sae(d_in, hook_name, k=8, seed=1, **model_from_pretrained_kwargs)``: a random
  SAELens ``TopKSAE`` reading ``hook_name`` (SAELens is imported only when this is called).

Why perturb everything: HF initialises RMSNorm weights to 1 (Qwen3) or 0 (Qwen3.5's
zero-centred norm) and some routers to 0, so a model fresh from ``__init__`` hides
layout mistakes (transposed experts, a forgotten ``1 + w``). Matrices are redrawn at
unit-variance-preserving scale so logits are far from uniform and greedy decoding has
clear winners.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ..remote import decoder_layers, decoder_stack, unembedding

ARCHITECTURES: tuple[str, ...] = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM",
)

# Text architecture -> (model_type for AutoConfig, multimodal architecture, multimodal model_type).
_MODEL_TYPES = {
    "Qwen3ForCausalLM": ("qwen3", None, None),
    "Qwen3MoeForCausalLM": ("qwen3_moe", None, None),
    "Qwen3_5ForCausalLM": ("qwen3_5_text", "Qwen3_5ForConditionalGeneration", "qwen3_5"),
    "Qwen3_5MoeForCausalLM": ("qwen3_5_moe_text", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe"),
}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 320  # > 256 bytes + specials, padded like the real Qwen vocabularies
MAX_POSITIONS = 512  # deliberately not TransformerLens's hard-coded 2048

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=MAX_POSITIONS,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,  # no eos_token_id: HF generation never stops early, like stop_at_eos=False
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_LINEAR_ATTN = dict(
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)


def arch_fields(arch: str, *, moe: Mapping, linear: Mapping, shared_expert: int) -> dict:
    """The config fields of ``arch`` beyond the dense ones, from its sizes of the MoE block (``num_experts``,
    ``num_experts_per_tok``, ``moe_intermediate_size``), the linear attention and the shared expert."""
    _check_arch(arch)
    return {
        "Qwen3ForCausalLM": {},
        "Qwen3MoeForCausalLM": {**moe, "norm_topk_prob": True},
        "Qwen3_5ForCausalLM": dict(linear),
        "Qwen3_5MoeForCausalLM": {**linear, **moe, "shared_expert_intermediate_size": shared_expert},
    }[arch]


_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=16,
)


def _check_arch(arch: str) -> None:
    if arch not in _MODEL_TYPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


# Fields the published configs of an architecture do not have (Qwen3.5-MoE: no dense MLP width).
_ARCH_ABSENT = {"Qwen3_5MoeForCausalLM": ("intermediate_size",)}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """The tiny text config of ``arch`` (an HF class name); ``overrides`` replace any field.

    Examples: ``tiny_config("Qwen3MoeForCausalLM", mlp_only_layers=[1])`` for a dense layer
    among MoE layers, ``tiny_config("Qwen3ForCausalLM", tie_word_embeddings=True)``. Fields the
    published configs of ``arch`` lack are left out too (see :mod:`.published_configs`).
    """
    _check_arch(arch)
    kwargs = {**_COMMON, **arch_fields(arch, moe=_MOE, linear=_LINEAR_ATTN, shared_expert=48), **overrides}
    for name in _ARCH_ABSENT.get(arch, ()):
        if name not in overrides:
            kwargs.pop(name, None)
    config = AutoConfig.for_model(_MODEL_TYPES[arch][0], **kwargs)
    config.architectures = [arch]
    return config


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter in place, reproducibly from ``seed``.

    Matrices (and stacked expert tensors) become N(0, 1/fan_in) with fan_in the last
    dimension; vectors (norm weights, biases, ``A_log``, ``dt_bias``) move by N(0, 0.2^2)
    away from their init value. Tied parameters are visited once.
    """
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:
            param.copy_(noise * param.shape[-1] ** -0.5)
        else:
            param.add_(0.2 * noise.to(param.dtype))
    return model


def tiny_model(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny fp32 ``arch`` model in eval mode with every weight perturbed (see :func:`perturb_`)."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return perturb_(model, seed).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges, built in memory (no download).

    Every byte is one token (ids 0..255 after the specials), so any string round-trips.
    Like Qwen's tokenizers it has no BOS token; ``<|endoftext|>`` (id 0) is EOS and pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=MAX_POSITIONS,
    )


def save_checkpoint(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    multimodal: bool = False,
    tokenizer: PreTrainedTokenizerFast | None = None,
    config_json: dict | None = None,
) -> Path:
    """Write ``model`` (safetensors) and a tokenizer to ``directory``; return the path.

    ``multimodal=True`` (Qwen3.5 and Qwen3.5-MoE only) writes the published layout: the
    text weights go under ``model.language_model.*`` of a ``...ForConditionalGeneration``
    model that also holds a tiny random vision tower, so loaders must skip ``model.visual.*``.
    """
    directory = Path(directory)
    if multimodal:
        model = _multimodal_from_text(model)
    model.save_pretrained(directory, safe_serialization=True)
    (tokenizer or tiny_tokenizer()).save_pretrained(directory)
    if config_json is not None:  # the exact key set, not transformers' re-serialisation of it
        (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    return directory


@torch.no_grad()
def _multimodal_from_text(text_model: PreTrainedModel) -> PreTrainedModel:
    import transformers

    arch = type(text_model).__name__
    _check_arch(arch)
    _, mm_arch, mm_type = _MODEL_TYPES[arch]
    if mm_arch is None:
        raise ValueError(f"{arch} has no published multimodal layout; use multimodal=False")
    text_config = text_model.config.to_dict()
    vision = {**_VISION, "out_hidden_size": text_model.config.hidden_size}
    config = AutoConfig.for_model(
        mm_type,
        text_config=text_config,
        vision_config=vision,
        tie_word_embeddings=text_model.config.tie_word_embeddings,
    )
    config.architectures = [mm_arch]
    mm_model = getattr(transformers, mm_arch)(config).to(torch.float32)
    perturb_(mm_model.model.visual, seed=1)
    decoder_stack(mm_model).load_state_dict(decoder_stack(text_model).state_dict())  # model.language_model
    unembedding(mm_model).load_state_dict(unembedding(text_model).state_dict())
    return mm_model.eval()


@torch.no_grad()
def hf_layer_outputs(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, [output of decoder layer n for every n])`` for one forward pass.

    Hooks, not ``output_hidden_states``: HF's last hidden state is taken after the final norm.
    """
    outputs: list[torch.Tensor] = []
    layers = decoder_layers(model)
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in layers]
    try:
        logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


@torch.no_grad()
def hf_generate_steered(
    model: PreTrainedModel,
    ids: torch.Tensor,
    layer: int,
    vector: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy ids (prompt included) with ``vector`` added to decoder layer ``layer``'s output.

    The tiny configs declare no EOS id, so HF generates exactly ``max_new_tokens`` tokens,
    like ``HookedTransformer.generate(stop_at_eos=False)``.
    """
    handle = decoder_layers(model)[layer].register_forward_hook(lambda _m, _a, out: out + vector)
    try:
        return model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
        )
    finally:
        handle.remove()


def tiny_topk_sae(d_in: int, hook_name: str, k: int = 8, seed: int = 1, **model_from_pretrained_kwargs):
    """A random SAELens ``TopKSAE`` (``d_sae = 4 * d_in``) whose metadata says it reads ``hook_name``.

    ``model_from_pretrained_kwargs`` is stored in the metadata, where SAELens records how the
    model it was trained on was loaded (e.g. ``center_writing_weights=False``).
    """
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook_name, model_from_pretrained_kwargs=model_from_pretrained_kwargs)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=4 * d_in, k=k, apply_b_dec_to_input=False, metadata=metadata))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(generator=generator)
    return sae
