"""Workarounds for upstream interactions, kept in one place."""

from __future__ import annotations

# anyio (under Gradio's server) requires every public attribute of a TypedAttributeSet subclass to be
# annotated, and nnsight mounts ``save`` on ``object``; those anyio modules are imported lazily, per
# request, and then fail. They are imported here once, with nnsight's mount lifted meanwhile.
_ANYIO_TYPED = ("anyio.abc", "anyio.streams.file", "anyio.streams.tls", "anyio._backends._asyncio")


def preload_anyio() -> None:
    """Import anyio's annotated-attribute modules with nnsight's ``object.save`` lifted (then restored)."""
    import importlib
    import sys

    nnsight = sys.modules.get("nnsight")
    mounted = nnsight is not None and "save" in vars(object)
    if mounted:
        from nnsight._c import mount, unmount

        unmount("save")
    try:
        for name in _ANYIO_TYPED:
            importlib.import_module(name)
    finally:
        if mounted:
            mount(nnsight.save, "save")
