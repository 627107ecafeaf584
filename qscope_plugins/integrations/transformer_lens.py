"""Qwen3, Qwen3-MoE, Qwen3.5 and Qwen3.5-MoE in TransformerLens's ``HookedTransformer``.

TransformerLens 3.9 has no registry for new architectures, so :func:`register` replaces the
few names it looks up at call time, each falling through to the original for every model
that is not one of ours:

- ``HookedTransformer.from_pretrained`` (inherited by ``from_pretrained_no_processing`` and
  SAELens's ``HookedSAETransformer``): decides once, from ``hf_model``'s config, a local
  ``config.json`` or a ``Qwen/Qwen3*`` hub config, whether the model is ours; if so it makes
  the three loading functions below answer for it during this one call.
- ``loading.get_official_model_name`` / ``get_pretrained_model_config`` /
  ``get_pretrained_state_dict``: accept the name, build the config with the architecture
  module (``n_ctx`` from the model config), convert the weights. With ``hf_model`` or a local
  directory nothing is fetched from the hub.
- ``TransformerBlock`` as seen by ``HookedTransformer.__init__``: architecture modules may
  supply their own blocks (mixed dense/MoE stacks, linear attention).
- ``HookedTransformer.load_and_process_state_dict`` (also reached by ``process_weights_``)
  skips ``fold_ln`` with a warning where the architecture cannot fold and records which
  processing was applied; :func:`warn_if_residual_changed` (called by SAELens's
  ``HookedSAETransformer.add_sae``, patched by the SAELens integration) warns when that
  processing changed the residual stream an SAE reads but the SAE expects the unprocessed one.

:func:`unregister` puts every original back.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import transformer_lens.loading_from_pretrained as loading
from transformer_lens import HookedTransformer
from transformers import PretrainedConfig

from ..models import architecture_of, available_architectures, module_for
from ..models._hf import find_hf_config, is_local_model, load_causal_lm
from ._patch import Changes

# Processing steps that change the values on the residual stream, and when TransformerLens
# actually applies them (its ProcessWeights.process_weights rule: only for LayerNorm models).
RESIDUAL_STEPS = {
    "center_writing_weights": lambda cfg: cfg.normalization_type in ("LN", "LNPre") and not cfg.final_rms,
}
_TL_DEFAULTS = {"center_writing_weights": True}

_HT_MODULE = importlib.import_module("transformer_lens.HookedTransformer")
_ORIGINAL: dict[str, Any] = {}  # what the patched names were, to call through to
_CHANGES = Changes()
_ACTIVE: contextvars.ContextVar[_Source | None] = contextvars.ContextVar("qscope_tl_source", default=None)


@dataclass(frozen=True)
class _Source:
    """Where one of our models comes from, resolved once per ``from_pretrained`` call."""

    name: str  # as the user gave it: a local dir or a hub id (weights load from it without hf_model)
    module: ModuleType
    text_config: PretrainedConfig
    tokenizer_name: str | None


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _resolve(model_name: str, hf_model=None, **hub_kwargs: Any) -> _Source | None:
    """A :class:`_Source` if ``model_name`` / ``hf_model`` is one of our architectures, else ``None``."""
    config = find_hf_config(model_name, hf_model, **hub_kwargs)
    module = module_for(architecture_of(config)) if config is not None else None
    if module is None:
        return None
    candidates = [model_name, getattr(hf_model, "name_or_path", None)]
    tokenizer_name = next((c for c in candidates if _has_tokenizer(c)), None)
    if tokenizer_name is None and not is_local_model(model_name):
        tokenizer_name = model_name  # a hub id: the tokenizer is fetched like TransformerLens does
    return _Source(model_name, module, config.get_text_config(), tokenizer_name)


def _active(name: str) -> _Source | None:
    source = _ACTIVE.get()
    return source if source is not None and name == source.name else None


def _get_official_model_name(model_name: str) -> str:
    return model_name if _active(model_name) else _ORIGINAL["get_official_model_name"](model_name)


def _get_pretrained_model_config(model_name: str, *args: Any, **kwargs: Any):
    source = _active(model_name)
    if source is None:
        return _ORIGINAL["get_pretrained_model_config"](model_name, *args, **kwargs)
    bound = inspect.signature(_ORIGINAL["get_pretrained_model_config"]).bind(model_name, *args, **kwargs)
    bound.apply_defaults()
    opts = bound.arguments
    if opts["checkpoint_index"] is not None or opts["checkpoint_value"] is not None:
        raise ValueError(f"{model_name} has no training checkpoints to load")
    cfg = source.module.hooked_config(source.text_config)
    changes: dict[str, Any] = dict(
        model_name=model_name.rstrip("/").split("/")[-1],
        tokenizer_name=source.tokenizer_name,
        device=opts["device"],
        n_devices=opts["n_devices"],
        dtype=opts["dtype"],
    )
    if opts["fold_ln"]:
        changes["normalization_type"] = "RMSPre"
    for key in ("default_prepend_bos", "n_ctx"):
        if opts[key] is not None:
            changes[key] = opts[key]
    if opts["first_n_layers"] is not None:
        changes["n_layers"] = opts["first_n_layers"]
    return dataclasses.replace(cfg, **changes)


def _get_pretrained_state_dict(official_model_name: str, cfg, hf_model=None, dtype=torch.float32, **kwargs: Any):
    source = _active(official_model_name)
    if source is None:
        return _ORIGINAL["get_pretrained_state_dict"](official_model_name, cfg, hf_model, dtype=dtype, **kwargs)
    if hf_model is None:
        # AutoModelForCausalLM maps the multimodal Qwen3.5 configs to the text model and drops
        # the vision weights, so no torchvision is needed.
        hf_model = load_causal_lm(source.name, dtype=kwargs.pop("torch_dtype", dtype), **kwargs)
        hf_model.requires_grad_(False)
    return source.module.convert_state_dict(hf_model, cfg)


def _fold_ln_supported(source: _Source) -> bool:
    check = getattr(source.module, "supports_fold_ln", None)
    return check is None or check(source.module.hooked_config(source.text_config))


def _model_folds_ln(cfg) -> bool:
    """The same rule for a model already built (``process_weights_``, ``load_and_process_state_dict``)."""
    module = module_for(getattr(cfg, "original_architecture", None))
    check = getattr(module, "supports_fold_ln", None) if module is not None else None
    return check is None or check(cfg)


def _warn_fold_ln(architecture: str, doing: str, stacklevel: int) -> None:
    warnings.warn(
        f"fold_ln is not supported for {architecture} blocks; {doing} with fold_ln=False "
        "(the residual stream is the same either way)",
        stacklevel=stacklevel,
    )


def _from_pretrained(cls, model_name: str, *args: Any, **kwargs: Any):
    original = _ORIGINAL["from_pretrained"]
    bound = inspect.signature(original).bind(cls, model_name, *args, **kwargs)
    extra = bound.arguments.get("from_pretrained_kwargs", {})
    hub_kwargs = {k: extra[k] for k in ("revision", "token") if k in extra}
    source = _resolve(model_name, bound.arguments.get("hf_model"), **hub_kwargs)
    if source is None:
        return original(*bound.args, **bound.kwargs)
    bound.apply_defaults()
    if bound.arguments["fold_ln"] and not _fold_ln_supported(source):
        _warn_fold_ln(architecture_of(source.text_config), "loading", stacklevel=4)
        bound.arguments["fold_ln"] = False
    token = _ACTIVE.set(source)
    try:
        return original(*bound.args, **bound.kwargs)
    finally:
        _ACTIVE.reset(token)


def _make_block(cfg, block_index: int):
    module = module_for(getattr(cfg, "original_architecture", None))
    make = getattr(module, "make_block", None)
    return make(cfg, block_index) if make is not None else _ORIGINAL["TransformerBlock"](cfg, block_index)


def _load_and_process_state_dict(self, state_dict, *args: Any, **kwargs: Any):
    bound = inspect.signature(_ORIGINAL["load_and_process_state_dict"]).bind(self, state_dict, *args, **kwargs)
    bound.apply_defaults()
    # Every processing route (from_pretrained, process_weights_, a direct call) honours the
    # architecture's supports_fold_ln: TransformerLens would fold into weights it does not know.
    if bound.arguments["fold_ln"] and not _model_folds_ln(self.cfg):
        _warn_fold_ln(self.cfg.original_architecture, "processing", stacklevel=3)
        bound.arguments["fold_ln"] = False
    # Evaluate TransformerLens's rule before loading: fold_ln may rewrite normalization_type.
    applied = [step for step, applies in RESIDUAL_STEPS.items() if bound.arguments[step] and applies(self.cfg)]
    result = _ORIGINAL["load_and_process_state_dict"](*bound.args, **bound.kwargs)
    self._qscope_residual_changes = sorted(set(getattr(self, "_qscope_residual_changes", [])) | set(applied))
    return result


def residual_stream_changes(model) -> list[str]:
    """Processing steps applied to ``model`` that changed its residual stream (``hook_resid_*``).

    For the Qwen3 / Qwen3.5 models (RMSNorm) this is always empty with TransformerLens 3.9:
    ``fold_ln`` only moves norm weights into the next linear layers, ``center_unembed``
    shifts logits, and ``center_writing_weights`` is skipped for RMSNorm models.
    """
    return list(getattr(model, "_qscope_residual_changes", []))


def warn_if_residual_changed(model, sae) -> None:
    """Warn when processing changed the residual stream ``sae`` reads but its config expects it unprocessed.

    Called by SAELens's ``HookedSAETransformer.add_sae`` once the SAELens integration registered.
    """
    hook = sae.cfg.metadata.hook_name or ""
    if "hook_resid" not in hook:
        return
    expected = sae.cfg.metadata.model_from_pretrained_kwargs or {}
    unexpected = [s for s in residual_stream_changes(model) if not expected.get(s, _TL_DEFAULTS[s])]
    if unexpected:
        warnings.warn(
            f"the SAE at {hook} expects a model loaded without {', '.join(unexpected)}, which changed "
            "this model's residual stream; load it with from_pretrained_no_processing(...) "
            f"or {', '.join(f'{s}=False' for s in unexpected)}",
            stacklevel=3,
        )


def register() -> list[str]:
    """Patch TransformerLens once; return ``"HookedTransformer:<arch>"`` for each usable architecture.

    ``HookedTransformer`` has no registry for architectures, so these names are replaced (see the
    module docstring); :func:`unregister` puts the originals back.
    """
    if not _CHANGES:
        for name in ("get_official_model_name", "get_pretrained_model_config", "get_pretrained_state_dict"):
            _ORIGINAL[name] = _CHANGES.patch(loading, name, globals()[f"_{name}"])
        original = vars(HookedTransformer)["from_pretrained"].__func__
        _ORIGINAL["from_pretrained"] = original
        _CHANGES.patch(HookedTransformer, "from_pretrained", classmethod(functools.wraps(original)(_from_pretrained)))
        _ORIGINAL["TransformerBlock"] = _CHANGES.patch(_HT_MODULE, "TransformerBlock", _make_block)
        _ORIGINAL["load_and_process_state_dict"] = _CHANGES.patch(
            HookedTransformer, "load_and_process_state_dict", _load_and_process_state_dict)
    return [f"HookedTransformer:{arch}" for arch in available_architectures()]


def patched() -> list[str]:
    """The TransformerLens names replaced now."""
    return _CHANGES.labels("patched")


def unregister() -> list[str]:
    """Put every original TransformerLens name back; return the names restored."""
    _ORIGINAL.clear()
    return _CHANGES.undo()
