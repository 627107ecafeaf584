"""``qscope contrast POS_FILE NEG_FILE``: features that separate two text sets, per layer."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .features import format_table
from .steer import add_model_arguments, emit, open_backend, open_saes, read_texts


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("contrast", help="rank SAE features by positive-vs-negative difference",
                              description=__doc__)
    p.add_argument("pos_file", help="positive texts (one per line, or .jsonl)")
    p.add_argument("neg_file", help="negative / neutral texts")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, nargs="+", required=True, help="decoder layers (0-based)")
    p.add_argument("--top", type=int, default=20, help="features per layer")
    p.add_argument("--rank-by", choices=("rate", "mean"), default="rate",
                   help="firing-rate difference (the demo's choice) or mean-activation difference")
    p.add_argument("--keep-first", action="store_true", help="also count each text's first token")
    p.add_argument("--drop-shared-tokens", action="store_true", help="ignore token ids present on both sides")
    p.add_argument("--drop-common-prefix", action="store_true", help="ignore the token prefix all texts share")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipes.discovery import contrast

    positive, negative = read_texts(args.pos_file), read_texts(args.neg_file)
    backend = open_backend(args)
    saes = open_saes(args, backend, args.layer)
    rows = contrast(
        backend, saes, positive, negative, top=args.top, rank_by=args.rank_by, skip_first=not args.keep_first,
        drop_shared_tokens=args.drop_shared_tokens, drop_common_prefix=args.drop_common_prefix,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    if args.json:
        emit(args, json.dumps({"model": args.model, "sae": args.sae, "rows": [asdict(r) for r in rows]}))
    else:
        emit(args, format_table(rows))
    return 0
