"""``qscope features``: the SAE features most active on a text, per layer."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .steer import add_model_arguments, emit, open_backend, open_saes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("features", help="top SAE features of a text at given layers",
                              description=__doc__)
    add_model_arguments(p)
    p.add_argument("--layer", type=int, nargs="+", required=True, help="decoder layers (0-based)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to analyse")
    source.add_argument("--file", help="read the text from this file")
    p.add_argument("--top", type=int, default=10, help="features per layer")
    p.add_argument("--keep-first", action="store_true", help="also score the first token (its norm is extreme)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..recipes.discovery import top_features

    text = Path(args.file).read_text(encoding="utf-8") if args.file else args.text
    if not text:
        raise ValueError("the text is empty")
    backend = open_backend(args)
    saes = open_saes(args, backend, args.layer)
    rows = top_features(backend, saes, text, top=args.top, skip_first=not args.keep_first)
    if args.json:
        emit(args, json.dumps({"model": args.model, "sae": args.sae, "rows": [asdict(r) for r in rows]}))
    else:
        emit(args, format_table(rows))
    return 0


def format_table(rows) -> str:
    """Rows of dataclasses as an aligned text table (header from the first row's fields)."""
    if not rows:
        return "(no features)"
    dicts = [asdict(r) for r in rows]
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in d.values()] for d in dicts]
    header = list(dicts[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
