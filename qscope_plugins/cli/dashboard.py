"""``qscope dashboard``: feature pages from an activation index as static HTML (opens without a server)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._explorer import parse_features
from ._options import add_json, add_top, deprecated


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="write feature pages from a qscope index as static HTML",
                              description=__doc__)
    p.add_argument("--index", type=Path, required=True, help="directory written by qscope index")
    p.add_argument("--features", nargs="+", required=True, metavar="L:F",
                   help="features as LAYER:IDS, e.g. 3:459 2:0-9 3:1,4 or 3:all")
    p.add_argument("--output-dir", type=Path, required=True, metavar="DIR",
                   help="dashboard directory (index.html + one page per feature)")
    deprecated(p, "--out", "--output-dir", "output_dir", type=Path)
    add_top(p, 20, "top-activating contexts per page")
    add_json(p, "print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..app.dashboard import write_dashboard
    from ..recipes.feature_index import FeatureIndex

    index = FeatureIndex.open(args.index)
    features = parse_features(args.features, list(index.config.layers), index.config.d_sae)
    path = write_dashboard(index, features, args.output_dir, n_top=args.top)
    if args.json:
        print(json.dumps({"index_html": str(path), "pages": len(features)}))
    else:
        print(f"wrote {len(features)} feature pages; open {path}")
    return 0
