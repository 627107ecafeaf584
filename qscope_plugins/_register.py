"""Explicit, idempotent registration with whichever frameworks are installed."""

from __future__ import annotations

import importlib
import importlib.util
import logging

from .integrations import INTEGRATIONS

log = logging.getLogger(__name__)


def register() -> dict[str, list[str]]:
    """Register Qwen-Scope models and SAEs with every installed framework.

    Returns ``{integration: [what it registered]}``; an integration whose framework is not
    installed (or whose module is not shipped yet) maps to an empty list. Calling this twice
    registers nothing twice: each integration keeps its own "already done" state.
    """
    done: dict[str, list[str]] = {}
    for name, framework in INTEGRATIONS:
        if importlib.util.find_spec(framework) is None:
            done[name] = []
            continue
        module_name = f"{__package__}.integrations.{name}"
        if importlib.util.find_spec(module_name) is None:
            done[name] = []
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # framework missing a dependency, or at a version without what we need
            if (err.name or "").split(".")[0] == __package__:
                raise
            done[name] = []
            continue
        done[name] = list(module.register())
    return done
