"""What one integration changed inside its framework, recorded so that it can be undone exactly.

Two kinds of change, listed apart (``registration_status()``, ``qscope doctor``):

- **registered**: an entry added to a registry the framework offers for it (SAELens's SAE class
  and loader registries, ``nnsight.register``); undoing removes the entry, or restores the one it
  replaced;
- **patched**: an attribute replaced where the framework has no extension point (TransformerLens's
  ``HookedTransformer`` loader, nnsight's request serializer); undoing puts the original object
  back (the very object, as found with ``inspect.getattr_static``), or deletes the attribute when
  the class only inherited it.

Imports only the standard library.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, MutableMapping
from typing import Any

_MISSING = object()


def _qualname(owner: Any) -> str:
    name = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__name__
    module = getattr(owner, "__module__", None)
    return name if inspect.ismodule(owner) or not module else f"{module}.{name}"


class Changes:
    """An ordered record of replaced attributes and registry entries, undone last-first."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, str, Callable[[], None]]] = []  # (kind, label, undo)

    def __bool__(self) -> bool:
        return bool(self._undo)

    def patch(self, owner: Any, name: str, value: Any) -> Any:
        """``owner.name = value``; return what ``owner.name`` was (the looked-up value, for calling)."""
        before = getattr(owner, name)
        raw = vars(owner).get(name, _MISSING)  # own attribute (the raw descriptor) or inherited

        def undo() -> None:
            if raw is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, raw)

        setattr(owner, name, value)
        self._undo.append(("patched", f"{_qualname(owner)}.{name}", undo))
        return before

    def register(self, mapping: MutableMapping, key: Any, value: Any, label: str) -> None:
        """``mapping[key] = value`` in a framework's registry; undoing restores or removes the entry."""
        before = mapping.get(key, _MISSING)

        def undo() -> None:
            if before is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = before

        mapping[key] = value
        self._undo.append(("registered", label, undo))

    def record(self, label: str, undo: Callable[[], None]) -> None:
        """A registration made through the framework's own call; ``undo`` takes it back."""
        self._undo.append(("registered", label, undo))

    def labels(self, kind: str) -> list[str]:
        """``"patched"`` or ``"registered"``: what is in place now, in the order it was done."""
        return [label for k, label, _ in self._undo if k == kind]

    def undo(self) -> list[str]:
        """Undo everything, last change first; return the labels undone. Idempotent."""
        done = []
        while self._undo:
            _, label, undo = self._undo.pop()
            undo()
            done.append(label)
        return done
