"""Published Qwen3.5 / Qwen3.5-MoE checkpoints in TransformerLens's ``TransformerBridge``, text-only.

The bridge already has adapters for all four Qwen text architectures. But the published
Qwen3.5 checkpoints declare ``Qwen3_5(Moe)ForConditionalGeneration``, which the bridge
routes to its multimodal adapter: that one needs torchvision and names the text layers
differently. Qwen-Scope SAEs read the text model's residual stream, so :func:`register`
wraps ``TransformerBridge.boot_transformers`` (and with it SAELens's
``SAETransformerBridge.boot_transformers``, which calls it) to boot these checkpoints with
the text adapter:

- a directory or hub id: the HF config's ``architectures`` is overridden to the text class
  (``hf_config_overrides``), so HF loads only the text weights (the vision tower is skipped);
- ``hf_model=`` a multimodal model: the bridge gets a text-only model that *shares* its
  language-model and ``lm_head`` modules (no copy).

Passing ``architectures`` in ``hf_config_overrides`` yourself turns this off for that call.
Only the public ``boot_transformers`` signature is used, and nothing from
``HookedTransformer``, so this also runs on TransformerLens 4.x.

:func:`register` also installs :mod:`._compat`, the version-guarded workarounds that keep the
bridge's own attention / Gated DeltaNet code working on newer transformers releases.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..models import architecture_of
from ..models._hf import TEXT_ARCHITECTURE, find_hf_config
from ..remote import decoder_stack, unembedding
from . import _compat
from ._patch import Changes

_CHANGES = Changes()


def text_only_model(hf_model: PreTrainedModel) -> PreTrainedModel:
    """A ``...ForCausalLM`` over the text part of a multimodal Qwen3.5 model, sharing its modules.

    The wrapper is built on the meta device, then its decoder and ``lm_head`` are replaced by
    the multimodal model's own, so no weight is copied and edits to either are seen by both.
    """
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(hf_model.config.get_text_config())
    text.model = decoder_stack(hf_model)
    text.lm_head = unembedding(hf_model)
    text.generation_config = hf_model.generation_config
    text.name_or_path = hf_model.name_or_path
    return text.train(hf_model.training)


def _text_only_arguments(arguments: dict[str, Any]) -> None:
    """Rewrite bound ``boot_transformers`` arguments in place so a multimodal Qwen3.5 boots text-only."""
    overrides = dict(arguments.get("hf_config_overrides") or {})
    if "architectures" in overrides:
        return
    hf_model = arguments.get("hf_model")
    hub_kwargs = {"revision": arguments["revision"]} if arguments.get("revision") else {}
    config = find_hf_config(arguments["model_name"], hf_model, **hub_kwargs)
    text_arch = TEXT_ARCHITECTURE.get(architecture_of(config) if config is not None else None)
    if text_arch is not None and hf_model is not None:
        arguments["hf_model"] = text_only_model(hf_model)
    elif text_arch is not None:
        arguments["hf_config_overrides"] = {**overrides, "architectures": [text_arch]}


def register() -> list[str]:
    """Wrap ``TransformerBridge.boot_transformers`` once; return what is routed text-only, and the
    upstream workarounds (:mod:`._compat`) that apply to the installed versions.

    The bridge's extension points cannot express this routing: ``ArchitectureAdapterFactory.
    register_adapter`` only picks the adapter, after ``boot`` has chosen the HF model class from
    the architecture (``AutoModelForImageTextToText`` for these names, vision tower included), and
    the adapter's ``prepare_loading`` / ``prepare_model`` hooks cannot change that class or swap
    in another model. Registering an adapter under the multimodal names would also take them from
    users who ask for TransformerLens's own (torchvision) adapter. So ``boot_transformers`` is
    wrapped, as a staticmethod (3.9) or classmethod, whichever kind it is.
    """
    if not _CHANGES:
        raw = inspect.getattr_static(TransformerBridge, "boot_transformers")
        original = raw.__func__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def boot_transformers(*args: Any, **kwargs: Any):
            bound = signature.bind(*args, **kwargs)
            _text_only_arguments(bound.arguments)
            return original(*bound.args, **bound.kwargs)

        _CHANGES.patch(TransformerBridge, "boot_transformers", type(raw)(boot_transformers))
    routed = [f"TransformerBridge:{mm}->{text}" for mm, text in TEXT_ARCHITECTURE.items()]
    return routed + [f"workaround:{name}" for name in _compat.apply()]


def patched() -> list[str]:
    """The TransformerLens attributes replaced now (the wrapper and the workarounds)."""
    return _CHANGES.labels("patched") + _compat.patched()


def unregister() -> list[str]:
    """Put every workaround's original and ``boot_transformers`` back; return what was undone."""
    return [f"workaround:{name}" for name in _compat.revert()] + _CHANGES.undo()
