"""The feature explorer: HTML feature pages and the static dashboard (no extra dependency), and the
Gradio app (``qscope app``, the ``app`` extra) in :mod:`qscope_plugins.app.gradio_app`."""
