"""SAELens: the Qwen-Scope architecture, and a safe and lean loader for the 14 releases.

After :func:`register`, ``SAE.from_pretrained("qwen-scope-3-1.7b-base-w32k-l50", "layer0")``
goes through :func:`qscope_plugins.load_sae` (``weights_only`` memory-mapped reading, about one
copy of the file in memory, correct Qwen3.5 module path) and returns a ``QwenScopeSAE``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import torch
from sae_lens import HookedSAETransformer
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from ..catalog import find_group
from ..sae.loading import load_sae
from ..sae.topk import ARCHITECTURE, QwenScopeSAE, QwenScopeSAEConfig
from ._patch import Changes
from .transformer_lens import warn_if_residual_changed

CONVERTER = "qscope"
SAELENS_CONVERTER = "qwen_scope"  # SAELens's own name for the Qwen-Scope releases' loader
_CHANGES = Changes()


def _layer_of(folder_name: str) -> int:
    match = re.fullmatch(r"layer(\d+)\.sae\.pt", folder_name)
    if match is None:
        raise ValueError(f"expected a Qwen-Scope file name like 'layer3.sae.pt', got {folder_name!r}")
    return int(match.group(1))


def _sae_lens_cfg(sae: QwenScopeSAE) -> dict[str, Any]:
    cfg = sae.cfg.to_dict()
    cfg["metadata"] = sae.cfg.metadata.to_dict()
    return cfg


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``cfg`` (a SAELens 6.x config dict) with ``overrides`` applied where SAELens would put them.

    SAELens's own loaders return flat pre-6.0 dicts, merge the overrides at the top and let
    ``handle_pre_6_0_config`` move the metadata keys (``context_size``, ``dataset_path``,
    ``neuronpedia_id``, ...) under ``metadata``. A 6.x dict skips that step, so here every key
    that is a config field replaces it and every other key goes into ``metadata``.
    """
    fields = {f.name for f in dataclasses.fields(QwenScopeSAEConfig)} - {"metadata"}
    out = {**cfg, "metadata": dict(cfg.get("metadata") or {})}
    for key, value in (overrides or {}).items():
        if key == "metadata":
            out["metadata"].update(value or {})
        elif key in fields:
            out[key] = value
        else:
            out["metadata"][key] = value
    return out


def qscope_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens ``PretrainedSaeHuggingfaceLoader`` over :func:`load_sae`."""
    overrides = dict(cfg_overrides or {})
    sae = load_sae(repo_id, _layer_of(folder_name), device=overrides.get("device", device),
                   dtype=overrides.get("dtype"), k=overrides.get("k"), relu=overrides.get("relu", True))
    state = {"W_enc": sae.W_enc.data, "W_dec": sae.W_dec.data, "b_enc": sae.b_enc.data, "b_dec": sae.b_dec.data}
    return apply_overrides(_sae_lens_cfg(sae), overrides), state, None


def qscope_config(
    repo_id: str,
    folder_name: str,
    device: str,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The SAELens config of one layer, from the catalog alone (no download)."""
    from ..sae.topk import make_config

    group = find_group(repo_id)
    if group is None:
        raise ValueError(f"{repo_id} is not a Qwen-Scope repository")
    layer = _layer_of(folder_name)
    cfg = make_config(group.d_model, group.d_sae, group.k, layer=layer, device=device,
                      model_name=group.model, hf_hook_name=group.hf_hook_name(layer),
                      metadata={"sae_source": repo_id, "qwen_scope_group": group.release})
    return apply_overrides(cfg.to_dict(), cfg_overrides)


def hf_hook_name(sae: QwenScopeSAE, model: Any) -> str:
    """The name of ``sae``'s decoder layer in ``model`` as actually loaded, for SAELens's HF route.

    ``metadata.hf_hook_name`` follows the published checkpoint: ``model.language_model.layers.N``
    for Qwen3.5 (``...ForConditionalGeneration``), ``model.layers.N`` otherwise. SAELens's
    ``load_model("AutoModelForCausalLM", checkpoint)`` loads Qwen3.5 text-only, whose layers are
    ``model.layers.N``. ``model`` is that ``HookedProxyLM`` or any HF causal / multimodal model;
    the layers are found with :func:`qscope_plugins.remote.layout`, the resolver every backend uses.
    """
    from sae_lens.load_model import HookedProxyLM

    from ..remote import layout

    layer = sae.layer
    if layer is None:
        raise ValueError(f"cannot tell the layer of this SAE from its hook_name {sae.cfg.metadata.hook_name!r}")
    where = layout(model.model if isinstance(model, HookedProxyLM) else model)
    return f"{where.path}.{where.check_layer(layer)}"


def use_hf_model(sae: QwenScopeSAE, model: Any) -> QwenScopeSAE:
    """Point ``sae``'s ``hook_name`` / ``hf_hook_name`` at its layer in ``model`` (see :func:`hf_hook_name`).

    For SAELens tools that read the hook from the SAE (``ActivationsStore.from_sae``,
    ``run_evals``) on a ``HookedProxyLM``. Changes ``sae.cfg.metadata`` in place and returns ``sae``;
    ``sae.layer`` still answers. Use a fresh SAE for HookedTransformer-style models
    (``blocks.N.hook_resid_post``).
    """
    name = hf_hook_name(sae, model)
    sae.cfg.metadata.hook_name = sae.cfg.metadata.hf_hook_name = name
    return sae


def _add_sae_checked(original: Any) -> Any:
    @functools.wraps(original)
    def add_sae(self, sae, *args: Any, **kwargs: Any):
        warn_if_residual_changed(self, sae)
        return original(self, sae, *args, **kwargs)

    return add_sae


def register() -> list[str]:
    """Register the SAE class and its training class and the ``qscope`` converter; idempotent.

    All through SAELens's registries: ``register_sae_class`` / ``register_sae_training_class``,
    and its loader tables ``NAMED_PRETRAINED_SAE_LOADERS`` / ``NAMED_PRETRAINED_SAE_CONFIG_GETTERS``,
    where ``qscope`` is added and ``qwen_scope`` (the converter SAELens's directory names for all
    14 Qwen-Scope releases) is pointed at the same loader, so ``SAE.from_pretrained(release, ...)``
    loads through :func:`load_sae` and SAELens's directory is neither read nor changed.
    One name is replaced, as SAELens has no hook for it: ``HookedSAETransformer.add_sae`` warns
    first when the model's processing changed the residual stream the SAE reads.
    """
    if _CHANGES:
        return []
    from ..sae.training import QwenScopeTrainingSAE, QwenScopeTrainingSAEConfig

    done: list[str] = []
    for registry, add, classes, what in (
        (SAE_CLASS_REGISTRY, register_sae_class, (QwenScopeSAE, QwenScopeSAEConfig), "sae class"),
        (SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class,
         (QwenScopeTrainingSAE, QwenScopeTrainingSAEConfig), "training sae class"),
    ):
        if registry.get(ARCHITECTURE) == classes:
            continue  # registered by an earlier import of this module (a reload)
        add(ARCHITECTURE, *classes)  # raises if another package took the name: registration fails, warned
        _CHANGES.record(f"{what} {ARCHITECTURE}", functools.partial(registry.pop, ARCHITECTURE, None))
        done.append(f"{what} {ARCHITECTURE}")
    for name in (CONVERTER, SAELENS_CONVERTER):
        label = f"converter {name}" + (" (the Qwen-Scope releases in SAELens's directory)" if name != CONVERTER else "")
        _CHANGES.register(loaders.NAMED_PRETRAINED_SAE_LOADERS, name, qscope_loader, label)
        _CHANGES.register(loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS, name, qscope_config, f"config getter {name}")
        done.append(label)
    _CHANGES.patch(HookedSAETransformer, "add_sae", _add_sae_checked(HookedSAETransformer.add_sae))
    return done


def patched() -> list[str]:
    """The SAELens names replaced now."""
    return _CHANGES.labels("patched")


def unregister() -> list[str]:
    """Remove the classes and converters, restore SAELens's ``qwen_scope`` loader and ``add_sae``."""
    return _CHANGES.undo()
