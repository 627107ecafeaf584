"""HookedTransformer support for the Qwen architectures TransformerLens lacks: one module each.

The registry below maps HF architecture class names (the text ``...ForCausalLM`` classes and
the multimodal ``...ForConditionalGeneration`` names that published Qwen3.5 checkpoints
declare) to a module ``qscope_plugins.models.<name>``. Modules are imported lazily, so one
that is missing or broken does not hide the others.

Contract for an architecture module:

``HF_ARCHITECTURES: tuple[str, ...]``
    The HF class names it handles (the same names that map to it here).
``hooked_config(hf_config) -> HookedTransformerConfig``
    ``hf_config`` is always the *text* config (``config.get_text_config()``), so a
    multimodal checkpoint looks like its text model. Set ``original_architecture`` to the
    text class name and ``n_ctx`` from ``max_position_embeddings``. Per-layer facts that
    TransformerLens's config has no field for go through
    :class:`qscope_plugins.models._common.QwenHookedConfig` (it keeps the HF text config).
    Loading options (dtype, device, ``fold_ln``, ``n_ctx``, ``first_n_layers`` ...) are
    applied afterwards by the integration, not here.
``convert_state_dict(hf_model, cfg) -> dict[str, Tensor]``
    HookedTransformer-format weights for the first ``cfg.n_layers`` layers. ``hf_model`` is
    the HF model as loaded or passed by the user: text-only or multimodal (use
    :func:`qscope_plugins.models._common.text_model`). Return views of the HF parameters
    wherever the layout allows, and materialise at most one layer's worth of new tensors at a
    time, so that loading holds no more than one extra layer beyond TransformerLens itself.
``make_block(cfg, block_index) -> nn.Module`` (optional)
    The block for layer ``block_index`` when TransformerLens's ``TransformerBlock`` does not
    fit (dense layers among MoE layers, linear attention ...). It must accept the
    ``TransformerBlock.forward`` arguments and expose ``hook_resid_pre/mid/post``; its
    ``hook_resid_post`` is the output of HF decoder layer ``block_index``.
``supports_fold_ln(cfg) -> bool`` (optional, default: always ``True``)
    ``False`` when TransformerLens's ``fold_ln`` cannot fold every norm of these blocks
    (it replaces every ``ln1``/``ln2`` by a weightless norm, but folds only into the weights
    it knows); the integration then loads with ``fold_ln=False`` and warns.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# HF architecture class name -> module name under qscope_plugins.models.
ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
}


def architecture_of(hf_config) -> str | None:
    """The first declared architecture of an HF config (object or dict), or ``None``."""
    archs = hf_config.get("architectures") if isinstance(hf_config, dict) else getattr(hf_config, "architectures", None)
    return archs[0] if archs else None


def module_for(architecture: str | None) -> ModuleType | None:
    """The module implementing ``architecture``, ``None`` if it is not one of ours.

    Raises ``NotImplementedError`` naming the module when the architecture is registered
    but its module is not available in this installation.
    """
    name = ARCHITECTURES.get(architecture or "")
    if name is None:
        return None
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise NotImplementedError(
            f"{architecture} is registered but {__name__}.{name} is not available"
        ) from exc


def available_architectures() -> list[str]:
    """The registered architectures whose module imports in this installation."""
    found = []
    for arch in ARCHITECTURES:
        try:
            module_for(arch)
        except NotImplementedError:
            continue
        found.append(arch)
    return found
