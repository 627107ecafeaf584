"""qscope-plugins: Qwen-Scope SAEs and Qwen3 / Qwen3.5 models in TransformerLens, SAELens and nnsight.

Importing the package registers everything with whichever frameworks are installed
(idempotently); :func:`register` does the same explicitly and says what it registered.
"""

from ._register import register
from .catalog import GROUPS, SAEGroup, find_group, get_group

# The SAE class subclasses SAELens's TopKSAE; importing it lazily keeps `qscope_plugins.remote`
# (shipped to NDIF servers, where SAELens is absent) importable without SAELens.
_LAZY = ("FeatureSubset", "QwenScopeSAE", "SAEFormatError", "TopKCodes", "load_sae")


def __getattr__(name: str):
    if name in _LAZY:
        from . import sae

        return getattr(sae, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "GROUPS",
    "FeatureSubset",
    "QwenScopeSAE",
    "SAEFormatError",
    "SAEGroup",
    "TopKCodes",
    "find_group",
    "get_group",
    "load_sae",
    "register",
]

register()
