"""``qscope features``: the SAE features most active on a text, per layer.

A text longer than the model's context is an error (nothing is truncated silently).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ._inputs import check_sources, open_backend, open_saes, read_texts
from ._options import (
    UsageError, add_first_token, add_layers, add_model_options, add_top, as_usage_errors, check_context,
    check_text, emit, output_file, resolve_layers,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("features", help="top SAE features of a text at given layers",
                              description=__doc__.split("\n\n")[0])
    add_model_options(p)
    add_layers(p, required=True, deprecated_alias="--layer")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to analyse")
    source.add_argument("--file", help="read the text from this file (the whole file is one text)")
    add_top(p, 10, "features per layer")
    add_first_token(p)
    p.set_defaults(func=run)


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return check_text(args.text, "--text")
    from ._options import input_file

    path = input_file(args.file, "--file")
    try:
        return check_text(path.read_text(encoding="utf-8"), f"--file {path}")
    except UnicodeDecodeError as err:
        raise UsageError(f"--file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def run(args: argparse.Namespace) -> int:
    from ..recipes.discovery import top_features

    text = _read_text(args)
    output_file(args.output)
    check_sources(args, args.layers)
    backend = open_backend(args)
    with as_usage_errors():
        layers = resolve_layers(args.layers, backend.n_layers)
        check_context(backend, [text], source="--text" if args.text is not None else args.file)
    saes = open_saes(args, backend, layers)
    rows = top_features(backend, saes, text, top=args.top, skip_first=args.skip_first_token)
    emit(args, {"model": args.model, "sae": args.sae, "rows": [asdict(r) for r in rows]}, format_table(rows))
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


__all__ = ["format_table", "read_texts"]
