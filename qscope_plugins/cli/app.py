"""``qscope app``: the feature explorer in the browser (Gradio; ``pip install 'qscope-plugins[app]'``).

Tabs: Text (per-token activations of the top features), Compare (two texts or text sets, top-K per
layer by activation-rate difference), Steer (baseline and steered generations, the reproducing
``qscope steer`` command), Feature (pages from a ``qscope index``) and Monitor (a saved classifier on
a text). With no arguments it opens on the bundled nano model and its SAEs, offline, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._explorer import DEMO_DATA, NANO, add_source_arguments, load_corpus, open_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("app", help="the feature explorer (Gradio): text, compare, steer, feature, monitor",
                              description=__doc__.split("\n\n")[0])
    add_source_arguments(p)
    p.add_argument("--index", type=Path,
                   help="feature index for the Feature tab (default for nano: one built once over the demo corpus)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: local only)")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    p.set_defaults(func=run)


def _nano_index(backend, saes) -> Path:
    """The nano demo index in the user cache, built on first use (resumable, reused afterwards)."""
    from ..recipes.feature_index import build_index

    name = "nano-index-layers" + "_".join(str(n) for n in sorted(saes))  # one index per layer choice
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qscope" / name
    texts, described = load_corpus(DEMO_DATA, NANO)
    build_index(backend, saes, texts, cache, model="nano (bundled)", sae_source="nano (bundled)",
                extra={"data": described}, progress=True)
    return cache


def run(args: argparse.Namespace) -> int:
    from ..app.explorer import Explorer
    from ..app.gradio_app import _gradio, launch
    from ..recipes.feature_index import FeatureIndex

    _gradio()  # a missing extra is reported before the model loads
    backend, saes, model, sae = open_model(args, args.layers)
    index_dir = args.index
    if index_dir is None and args.model == NANO and args.sae is None:
        index_dir = _nano_index(backend, saes)
    index = FeatureIndex.open(index_dir) if index_dir is not None else None
    k = args.k if args.sae is not None or args.model != NANO else next(iter(saes.values())).cfg.k
    explorer = Explorer(backend, saes, model=model, sae=sae, k=k, index=index, backend_kind=args.backend)
    launch(explorer, port=args.port, share=args.share, host=args.host, block=True)
    return 0
