"""qscope-plugins: Qwen-Scope SAEs and Qwen3 / Qwen3.5 models in TransformerLens, SAELens and nnsight.

Importing the package imports no framework (and not torch): it registers with each installed
framework as soon as that framework is imported, before or after this package, and warns with a
:class:`RegistrationWarning` when one cannot be registered (see ``_register``).
:func:`register` imports and registers every installed framework explicitly and says what it
registered; :func:`registration_status` says where each framework stands; :func:`unregister`
undoes it all, exactly.
"""

from . import _register
from ._register import FrameworkStatus, RegistrationWarning, register, registration_status, unregister
from .catalog import GROUPS, SAEGroup, find_group, get_group

# The SAE class subclasses SAELens's TopKSAE; importing it lazily keeps `qscope_plugins.remote`
# (shipped to NDIF servers, where SAELens is absent) importable without SAELens.
_LAZY = ("FeatureSubset", "QwenScopeSAE", "SAEFormatError", "SparseAutoencoder", "TopKCodes", "load_feature_subset",
         "load_sae")


def __getattr__(name: str):
    if name in _LAZY:
        from . import sae

        return getattr(sae, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "GROUPS",
    "FeatureSubset",
    "FrameworkStatus",
    "QwenScopeSAE",
    "RegistrationWarning",
    "SAEFormatError",
    "SAEGroup",
    "SparseAutoencoder",
    "TopKCodes",
    "find_group",
    "get_group",
    "load_feature_subset",
    "load_sae",
    "register",
    "registration_status",
    "unregister",
]

_register.activate()
