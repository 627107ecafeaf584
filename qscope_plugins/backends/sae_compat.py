"""Whether an SAE fits a model: its layer, its width and the backbone it was trained on.

:meth:`Backend.check_sae <qscope_plugins.backends.base.Backend.check_sae>` is the entry point;
the logic lives here, apart from the capture and generation plumbing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


def sae_backbone(sae) -> str | None:
    """The backbone id an SAE (``QwenScopeSAE`` or ``FeatureSubset``) was trained on, when recorded."""
    from ..catalog import find_group

    cfg = getattr(sae, "cfg", None)
    name = getattr(getattr(cfg, "metadata", None), "model_name", None)
    if name:
        return name
    group = find_group((getattr(sae, "metadata", None) or {}).get("qwen_scope_group") or "")
    return group.model if group else None


def backbone_key(name: str) -> str:
    """``"Qwen/Qwen3-1.7B-Base"``, ``"/models/qwen3-1.7b"`` -> ``"qwen3-1.7b"``: hub id or path, base or not."""
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in ("-base", "-instruct"):
        key = key.removesuffix(suffix)
    return key


def check_sae(
    sae, layer: int | None, check_layer: Callable[[int], int], d_model: int, model_name: str | None
) -> int:
    """See :meth:`Backend.check_sae`; ``check_layer`` is the model's layer check."""
    own_layer = getattr(sae, "layer", None)
    if layer is None:
        if own_layer is None:
            raise ValueError("this SAE does not record its layer; pass layer=")
        layer = own_layer
    layer = check_layer(layer)
    d_in = sae.d_in
    if d_in != d_model:
        raise ValueError(f"SAE d_model {d_in} does not match the model's d_model {d_model}")
    # stacklevel 3: the warning points at the caller of Backend.check_sae.
    if own_layer is not None and own_layer != layer:
        warnings.warn(f"SAE was trained on layer {own_layer} but is used at layer {layer}", stacklevel=3)
    trained_on = sae_backbone(sae)
    if trained_on and model_name and backbone_key(trained_on) != backbone_key(model_name):
        warnings.warn(
            f"SAE was trained on {trained_on} but the model is {model_name}; its features may not transfer",
            stacklevel=3,
        )
    return layer
