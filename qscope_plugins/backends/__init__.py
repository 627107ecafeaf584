"""Residual capture and interventions behind one interface, implemented once per framework.

>>> from qscope_plugins.backends import load_backend, Intervention
>>> backend = load_backend("Qwen/Qwen3-1.7B-Base", kind="hf")            # doctest: +SKIP
>>> backend.generate(["Hello"], max_new_tokens=8,
...                  interventions=[Intervention(10, vector=5 * direction)])  # doctest: +SKIP

Recipes accept any :class:`Backend`; :func:`as_backend` wraps a model object the user already
holds (HF ``PreTrainedModel``, ``HookedTransformer``, ``TransformerBridge``, nnsight model).
"""

from __future__ import annotations

import importlib

from ..remote import Intervention, LayerRangeError
from .base import Backend
from .editing import Editor
from .types import Batch, Generation, Prompts, ResidualBatch, Sampling

# kind -> (module in this package, class name). Each class has ``from_pretrained(model, **kw)``
# (hub id or local dir) and ``wraps(obj) -> bool`` (is ``obj`` a model this backend drives).
KINDS: dict[str, tuple[str, str]] = {
    "hf": ("hf", "HFBackend"),
    "transformer-lens": ("transformer_lens", "TransformerLensBackend"),
    "nnsight": ("nnsight", "NNsightBackend"),
}


def backend_class(kind: str) -> type[Backend]:
    """The backend class for ``kind`` (one of :data:`KINDS`), imported on demand."""
    if kind not in KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(KINDS)}")
    module, cls = KINDS[kind]
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    except ImportError as err:  # its framework (or the backend module) is not installed
        raise ValueError(f"the {kind} backend is not available: {err}") from err


def load_backend(model: str, kind: str = "hf", **kwargs) -> Backend:
    """Load ``model`` (hub id or local directory) with the ``kind`` backend; ``kwargs`` go to it."""
    return backend_class(kind).from_pretrained(model, **kwargs)


def as_backend(obj, tokenizer=None) -> Backend:
    """``obj`` itself if it is a :class:`Backend`, else the backend that drives that model object."""
    if isinstance(obj, Backend):
        return obj
    for kind in KINDS:
        try:
            cls = backend_class(kind)
        except ValueError:  # framework (or that backend module) not installed
            continue
        if cls.wraps(obj):
            return cls(obj, tokenizer=tokenizer)
    raise TypeError(f"no backend drives a {type(obj).__name__}; pass an HF, TransformerLens or nnsight model")


__all__ = [
    "KINDS",
    "Backend",
    "Batch",
    "Editor",
    "Generation",
    "Intervention",
    "LayerRangeError",
    "Prompts",
    "ResidualBatch",
    "Sampling",
    "as_backend",
    "backend_class",
    "load_backend",
]
