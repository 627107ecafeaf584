"""``qscope contrast POS_FILE NEG_FILE``: features that separate two text sets, per layer.

A text longer than the model's context is an error (nothing is truncated silently).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ._inputs import check_sources, open_backend, open_saes, read_texts
from ._options import (
    add_first_token, add_layers, add_model_options, add_top, as_usage_errors, check_context, emit, output_file,
    resolve_layers,
)
from .features import format_table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("contrast", help="rank SAE features by positive-vs-negative difference",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("pos_file", help="positive texts (one per line, or .jsonl)")
    p.add_argument("neg_file", help="negative / neutral texts")
    add_model_options(p)
    add_layers(p, required=True, deprecated_alias="--layer")
    add_top(p, 20, "features per layer")
    p.add_argument("--rank-by", choices=("rate", "mean"), default="rate",
                   help="firing-rate difference (the demo's choice) or mean-activation difference")
    add_first_token(p)
    p.add_argument("--drop-shared-tokens", action="store_true", help="ignore token ids present on both sides")
    p.add_argument("--drop-common-prefix", action="store_true", help="ignore the token prefix all texts share")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipes.discovery import contrast

    positive, negative = read_texts(args.pos_file, "POS_FILE"), read_texts(args.neg_file, "NEG_FILE")
    output_file(args.output)
    check_sources(args, args.layers)
    backend = open_backend(args)
    with as_usage_errors():
        layers = resolve_layers(args.layers, backend.n_layers)
        check_context(backend, positive, source=args.pos_file)
        check_context(backend, negative, source=args.neg_file)
    saes = open_saes(args, backend, layers)
    rows = contrast(
        backend, saes, positive, negative, top=args.top, rank_by=args.rank_by, skip_first=args.skip_first_token,
        drop_shared_tokens=args.drop_shared_tokens, drop_common_prefix=args.drop_common_prefix,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    emit(args, {"model": args.model, "sae": args.sae, "rows": [asdict(r) for r in rows]}, format_table(rows))
    return 0
