"""The Qwen-Scope SAE format, its loaders, the fast Top-k SAE class and the interface recipes use.

The names below are imported on first use (PEP 562), so torch-only submodules such as
:mod:`.metrics` and :mod:`.protocol` can be imported without SAELens (the SAE class builds on it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "FeatureSubset": ".features",
    "SAEFormatError": ".format",
    "load_feature_subset": ".loading",
    "load_sae": ".loading",
    "SparseAutoencoder": ".protocol",
    "QwenScopeSAE": ".topk",
    "TopKCodes": ".topk",
}

__all__ = ["FeatureSubset", "QwenScopeSAE", "SAEFormatError", "SparseAutoencoder", "TopKCodes", "load_feature_subset",
           "load_sae"]

if TYPE_CHECKING:
    from .features import FeatureSubset
    from .format import SAEFormatError
    from .loading import load_feature_subset, load_sae
    from .protocol import SparseAutoencoder
    from .topk import QwenScopeSAE, TopKCodes


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
