"""The Qwen-Scope SAE format, its loader and the fast Top-k SAE class."""

from .features import FeatureSubset
from .format import SAEFormatError
from .loading import load_sae
from .topk import QwenScopeSAE, TopKCodes

__all__ = ["FeatureSubset", "QwenScopeSAE", "SAEFormatError", "TopKCodes", "load_sae"]
