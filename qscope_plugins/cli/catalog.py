"""``qscope catalog``: the 14 Qwen-Scope SAE groups as a table or JSON."""

from __future__ import annotations

import argparse
import json

from ..catalog import GROUPS
from ._options import add_json

COLUMNS = ("release", "repo_id", "model", "family", "moe", "n_layers", "d_model", "d_sae", "k", "trained_on")


def run(args: argparse.Namespace) -> int:
    rows = [group.to_dict() for group in GROUPS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cells = [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    for r in [list(COLUMNS), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("catalog", help="list the Qwen-Scope SAE groups")
    add_json(parser, "print a JSON list of objects")
    parser.set_defaults(func=run)
