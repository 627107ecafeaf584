"""The Qwen-Scope SAE format, its loaders, the fast Top-k SAE class and the interface recipes use."""

from .features import FeatureSubset
from .format import SAEFormatError
from .loading import load_feature_subset, load_sae
from .protocol import SparseAutoencoder
from .topk import QwenScopeSAE, TopKCodes

__all__ = ["FeatureSubset", "QwenScopeSAE", "SAEFormatError", "SparseAutoencoder", "TopKCodes", "load_feature_subset",
           "load_sae"]
