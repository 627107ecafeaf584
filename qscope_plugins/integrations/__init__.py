"""One small module per framework; each exposes an idempotent ``register() -> list[str]``.

A module may import its framework at top level: :mod:`qscope_plugins._register` imports it
only once that framework is imported (or on an explicit :func:`qscope_plugins.register`).
"""

# Order matters: SAELens imports TransformerLens, and the bridge module builds on both.
INTEGRATIONS: tuple[tuple[str, str], ...] = (
    ("saelens", "sae_lens"),
    ("transformer_lens", "transformer_lens"),
    ("bridge", "transformer_lens"),
    ("nnsight", "nnsight"),
)

# The distributions (``_versions.WINDOWS`` keys) each module imports and patches against: one
# outside its tested window and the integration is refused, with a warning naming it.
REQUIRES: dict[str, tuple[str, ...]] = {
    "saelens": ("sae-lens", "torch"),
    "transformer_lens": ("transformer-lens", "transformers", "torch"),
    "bridge": ("transformer-lens", "transformers", "torch"),
    "nnsight": ("nnsight", "torch"),
}
