"""Workarounds for upstream behaviour: TransformerLens's bridge against newer transformers releases.

Every workaround here is

- **narrow**: it acts only when the HF module a bridge component wraps comes from one of the
  Qwen modelling modules in :data:`QWEN_MODULES`; every other model sees TransformerLens unchanged;
- **version-guarded**: it is installed only on the transformers / TransformerLens versions where
  the upstream behaviour was observed (``applies``);
- **reversible**: the original attribute is kept and :func:`revert` puts it back (:mod:`._patch`).

:func:`apply` is called by :func:`qscope_plugins.integrations.bridge.register`; docs/models.md
("Upstream behaviour and workarounds") gives each root cause and the upstream report.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._versions import installed, parse
from ._patch import Changes

# HF modelling modules whose attention / Gated DeltaNet modules the workarounds may touch.
QWEN_MODULES = frozenset(
    f"transformers.models.{name}.modeling_{name}" for name in ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")
)


def is_qwen(module: Any) -> bool:
    """Whether ``module`` (an HF submodule a bridge component wraps) is one of the Qwen text models'."""
    return type(module).__module__ in QWEN_MODULES


def _version_at_least(package: str, low: tuple[int, ...], high: tuple[int, ...] | None = None) -> bool:
    version = installed(package)
    if version is None:
        return False
    v = parse(version)
    return v >= low and (high is None or v < high)


def _tl3_bridge() -> bool:
    """TransformerLens 3.x: the release line whose bridge sources these workarounds were written against."""
    return _version_at_least("transformer-lens", (3, 9), (4,))


# --- transformers >= 5.24: the per-layer cache argument is called `cache` ---------------------------
# Decoder layers call `self_attn(..., cache=cache)` and `linear_attn(..., cache=cache)` (formerly
# `past_key_values=` / `cache_params=`). The bridge's attention reads only `past_key_values` /
# `layer_past`, so the KV cache is never extended; its Gated DeltaNet takes its prefill-only path
# whenever `cache_params` is absent, so the conv / recurrent state is never read or written.

def _cache_kwarg_renamed() -> bool:
    return _version_at_least("transformers", (5, 24)) and _tl3_bridge()


def _attention_sees_cache(original: Callable) -> Callable:
    @functools.wraps(original)
    def _update_kv_cache(self, k, v, **kwargs):
        cache = kwargs.get("cache")
        if cache is not None and kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            if is_qwen(self.original_component):
                kwargs["past_key_values"] = cache
        return original(self, k, v, **kwargs)

    return _update_kv_cache


def _gated_delta_net_sees_cache(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if (
            kwargs.get("cache") is not None
            and kwargs.get("cache_params") is None
            and self.original_component is not None
            and is_qwen(self.original_component)
        ):
            return self._native_forward(*args, **kwargs)  # HF's forward with the cache, as before 5.24
        return original(self, *args, **kwargs)

    return forward


# --- transformers >= 5.15: the Gated DeltaNet kernels are module-level functions --------------------
# `Qwen3_5(Moe)GatedDeltaNet` no longer carries `causal_conv1d_fn` / `chunk_gated_delta_rule`
# attributes; the bridge's hooked (prefill) forward reads both.

def _kernels_moved() -> bool:
    return _version_at_least("transformers", (5, 15)) and _tl3_bridge()


def _legacy_kernels(hf: Any) -> dict[str, Callable]:
    """The two attributes the bridge reads, built from ``hf``'s own modelling module."""
    modeling = importlib.import_module(type(hf).__module__)
    conv, chunk = getattr(modeling, "causal_conv1d_fn", None), getattr(modeling, "torch_chunk_gated_delta_rule", None)
    if conv is None or chunk is None:
        return {}

    def causal_conv1d_fn(x, weight, bias=None, activation=None, seq_idx=None):
        # The bridge calls the old `causal_conv1d` package signature; HF's function is the same
        # depthwise causal conv (+ activation), with the hub kernel when one is enabled.
        return conv(x, weight, bias, activation=activation)

    return {"causal_conv1d_fn": causal_conv1d_fn, "chunk_gated_delta_rule": chunk}


def _gated_delta_net_kernels(original: Callable) -> Callable:
    @functools.wraps(original)
    def _hooked_forward(self, *args, **kwargs):
        hf = self.original_component
        added: list[str] = []
        if is_qwen(hf):
            for name, fn in _legacy_kernels(hf).items():
                if not hasattr(hf, name):
                    object.__setattr__(hf, name, fn)  # for this call only; removed below
                    added.append(name)
        try:
            return original(self, *args, **kwargs)
        finally:
            for name in added:
                hf.__dict__.pop(name, None)

    return _hooked_forward


@dataclass(frozen=True)
class Workaround:
    """One wrapped attribute: ``owner.attribute = wrap(original)`` while ``applies()``."""

    name: str
    owner: str  # "module:Class"
    attribute: str
    wrap: Callable[[Callable], Callable]
    applies: Callable[[], bool]
    versions: str  # where the upstream behaviour exists, for docs and messages

    def target(self) -> type:
        module, cls = self.owner.split(":")
        return getattr(importlib.import_module(module), cls)


_GDN = "transformer_lens.model_bridge.generalized_components.gated_delta_net:GatedDeltaNetBridge"
WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround(
        "bridge-attention-cache-kwarg",
        "transformer_lens.model_bridge.generalized_components.attention:AttentionBridge",
        "_update_kv_cache", _attention_sees_cache, _cache_kwarg_renamed,
        "transformers>=5.24 with transformer-lens>=3.9,<4",
    ),
    Workaround(
        "bridge-gated-delta-net-cache-kwarg", _GDN, "forward", _gated_delta_net_sees_cache, _cache_kwarg_renamed,
        "transformers>=5.24 with transformer-lens>=3.9,<4",
    ),
    Workaround(
        "bridge-gated-delta-net-kernels", _GDN, "_hooked_forward", _gated_delta_net_kernels, _kernels_moved,
        "transformers>=5.15 with transformer-lens>=3.9,<4",
    ),
)

_CHANGES = Changes()
_ACTIVE: list[str] = []  # names of the workarounds in place, in WORKAROUNDS order


def apply() -> list[str]:
    """Install every workaround that applies to the installed versions (idempotent); return the active names."""
    for w in WORKAROUNDS:
        if w.name in _ACTIVE or not w.applies():
            continue
        cls = w.target()
        _CHANGES.patch(cls, w.attribute, w.wrap(inspect.getattr_static(cls, w.attribute)))
        _ACTIVE.append(w.name)
    return active()


def active() -> list[str]:
    return [w.name for w in WORKAROUNDS if w.name in _ACTIVE]


def patched() -> list[str]:
    """The attributes the active workarounds replaced (``module.Class.attribute``)."""
    return _CHANGES.labels("patched")


def revert() -> list[str]:
    """Put every original back (the class's own attribute, or the inherited one); return the names reverted."""
    reverted = list(reversed(_ACTIVE))
    _CHANGES.undo()
    _ACTIVE.clear()
    return reverted
