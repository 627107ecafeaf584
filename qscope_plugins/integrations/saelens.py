"""SAELens: the Qwen-Scope architecture, a safe and lean loader, and the 14 releases.

After :func:`register`, ``SAE.from_pretrained("qwen-scope-3-1.7b-base-w32k-l50", "layer0")``
goes through :func:`qscope_plugins.load_sae` (``weights_only`` memory-mapped reading, about one
copy of the file in memory, correct Qwen3.5 module path) and returns a ``QwenScopeSAE``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import replace
from typing import Any

import torch
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from ..catalog import GROUPS, find_group
from ..sae.loading import load_sae
from ..sae.topk import ARCHITECTURE, QwenScopeSAE, QwenScopeSAEConfig

CONVERTER = "qscope"


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


def _add_releases(directory: dict[str, PretrainedSAELookup]) -> list[str]:
    done = []
    for group in GROUPS:
        entry = directory.get(group.release)
        if entry is not None and entry.conversion_func == CONVERTER:
            continue
        layers = {f"layer{n}": group.filename(n) for n in range(group.n_layers)}
        if entry is None:
            # sae_lens.evals (all_loadable_saes) reads both maps for every SAE; SAELens's own
            # entries for these releases carry the same placeholders (1.0, k): nothing is published.
            entry = PretrainedSAELookup(
                release=group.release, repo_id=group.repo_id, model=group.model, conversion_func=CONVERTER,
                saes_map=layers, expected_var_explained=dict.fromkeys(layers, 1.0),
                expected_l0=dict.fromkeys(layers, group.k), neuronpedia_id={}, norm_scaling_factor={},
                config_overrides=None,
            )
        directory[group.release] = replace(entry, conversion_func=CONVERTER)
        done.append(f"release {group.release}")
    return done


def _directory_with_releases() -> dict[str, PretrainedSAELookup]:
    directory = get_pretrained_saes_directory()  # SAELens's own, cached: parsed once
    _add_releases(directory)
    return directory


def _defer_releases() -> bool:
    """Add the releases when SAELens first reads its directory, not now; True if newly arranged.

    SAELens parses its 1.5 MB ``pretrained_saes.yaml`` on first use (seconds); registering the
    releases eagerly would charge that to every ``import sae_lens``. Its modules call
    ``get_pretrained_saes_directory`` by name, so each name bound to it points at a wrapper that
    adds the releases to SAELens's cached dict (the one every caller shares).
    """
    _directory_with_releases.cache_info = get_pretrained_saes_directory.cache_info
    _directory_with_releases.cache_clear = get_pretrained_saes_directory.cache_clear
    changed = False
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "sae_lens" and vars(module).get("get_pretrained_saes_directory") is (
            get_pretrained_saes_directory
        ):
            module.get_pretrained_saes_directory = _directory_with_releases
            changed = True
    return changed


def register() -> list[str]:
    """Register the SAE class and its training class, the ``qscope`` converter and all 14 releases; idempotent.

    The releases join SAELens's directory when SAELens first reads it, or now if it already has
    (then each ``"release <name>"`` added is listed).
    """
    done: list[str] = []
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, QwenScopeSAE, QwenScopeSAEConfig)
        done.append(f"sae class {ARCHITECTURE}")
    if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        from ..sae.training import QwenScopeTrainingSAE, QwenScopeTrainingSAEConfig

        register_sae_training_class(ARCHITECTURE, QwenScopeTrainingSAE, QwenScopeTrainingSAEConfig)
        done.append(f"training sae class {ARCHITECTURE}")
    if loaders.NAMED_PRETRAINED_SAE_LOADERS.get(CONVERTER) is not qscope_loader:
        loaders.NAMED_PRETRAINED_SAE_LOADERS[CONVERTER] = qscope_loader
        loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS[CONVERTER] = qscope_config
        done.append(f"converter {CONVERTER}")
    cache_info = getattr(get_pretrained_saes_directory, "cache_info", None)
    if cache_info is None or cache_info().currsize:
        done += _add_releases(get_pretrained_saes_directory())
    elif _defer_releases():
        done.append(f"{len(GROUPS)} releases, added when SAELens first reads its directory")
    return done
