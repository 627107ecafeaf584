"""One small module per framework; each exposes an idempotent ``register() -> list[str]``.

A module may import its framework at top level: :func:`qscope_plugins.register` treats a
``ModuleNotFoundError`` for the framework itself as "not installed" and skips it.
"""

# Order matters: SAELens imports TransformerLens, and the bridge module builds on both.
INTEGRATIONS: tuple[tuple[str, str], ...] = (
    ("saelens", "sae_lens"),
    ("transformer_lens", "transformer_lens"),
    ("bridge", "transformer_lens"),
    ("nnsight", "nnsight"),
)
