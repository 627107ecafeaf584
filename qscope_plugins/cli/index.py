"""``qscope index``: a sparse, resumable activation index of SAE features over a corpus.

One pass stores every non-zero Top-k activation per layer (feature-major), plus each feature's logit
effects and decoder-cosine neighbours, so ``qscope dashboard``, ``qscope explain`` and the app's
Feature tab build any feature's page from it in milliseconds. An interrupted run resumes when rerun
with the same arguments; under ``torchrun`` / ``accelerate launch`` the batches are shared out over the
ranks (the same index, byte for byte; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._explorer import add_source_arguments, load_corpus, neuronpedia_ids, open_model
from ._options import UsageError, add_first_token, add_json, deprecated, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("index", help="index SAE activations over a corpus (for feature pages)",
                              description=__doc__.split("\n\n")[0])
    add_source_arguments(p)
    p.add_argument("--data", default="demo",
                   help="texts: a file (one per line, or .jsonl) or 'demo' (the nano corpus; the default)")
    p.add_argument("--output-dir", type=Path, required=True, metavar="DIR",
                   help="index directory (created; resumed if interrupted)")
    deprecated(p, "--out", "--output-dir", "output_dir", type=Path)
    p.add_argument("--max-tokens", type=positive_int, default=256, help="cut each text to this many tokens")
    add_first_token(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass (and per resumable step)")
    add_json(p, "print a JSON summary")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..distributed import command_world
    from ..recipes.feature_index import build_index

    if args.max_tokens < 2:
        raise UsageError("--max-tokens must be >= 2")
    texts, described = load_corpus(args.data, args.model)
    with command_world(args, "index") as world:
        backend, saes, model, sae = open_model(args, args.layers)
        index = build_index(
            backend, saes, texts, args.output_dir, model=args.model if args.model != "nano" else "nano (bundled)",
            sae_source=args.sae or "nano (bundled)", skip_first_token=args.skip_first_token,
            max_tokens=args.max_tokens, batch_size=args.batch_size,
            extra={"data": described, "model_path": model, "sae_path": sae,
                   "neuronpedia_ids": neuronpedia_ids(sae, list(saes))},
            progress=not args.no_progress, world=world,
        )
        if not world.is_main:
            return 0
    cfg = index.config
    summary = {"output_dir": str(args.output_dir), "layers": list(cfg.layers), "d_sae": cfg.d_sae, "documents": cfg.n_docs,
               "tokens": cfg.n_tokens, "truncated_docs": index.meta.get("truncated_docs", 0)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"indexed {cfg.n_docs} texts ({cfg.n_tokens} tokens) at layers {list(cfg.layers)} into {args.output_dir}",
              file=sys.stdout)
    return 0
