"""``qscope footprint``: benchmark feature footprints into a resumable sparse store.

Re-running the same command after an interruption resumes from the last completed batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .steer import add_model_arguments, emit, open_backend, open_saes, read_texts


def parse_benchmark(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {value!r}")
    return name, Path(path)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "footprint",
        help="SAE feature footprints of benchmarks (sparse, resumable store)",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(p)
    p.add_argument("--layers", type=int, nargs="+", required=True, help="decoder layers (0-based); one forward pass serves all")
    p.add_argument(
        "--benchmark",
        type=parse_benchmark,
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="benchmark samples: .jsonl records or one text per line (repeatable)",
    )
    p.add_argument("--store", type=Path, required=True, help="store directory (one sub-directory per benchmark)")
    p.add_argument("--template", default="{text}", help="prompt template over the record fields, e.g. 'Q: {question}\\nA:'")
    p.add_argument("--id-field", help="record field holding the sample id (default: line number from 0)")
    p.add_argument(
        "--position",
        choices=("last", "any", "all"),
        default="last",
        help="last token (the report), any token, or all tokens with counts",
    )
    p.add_argument("--keep-first-token", action="store_true", help="let the first token count for any/all")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store for these benchmarks")
    p.set_defaults(func=run)


def _samples(path: Path) -> list:
    from ..recipes.footprints import read_jsonl

    return read_jsonl(path) if path.suffix == ".jsonl" else read_texts(path)


def run(args: argparse.Namespace) -> int:
    from ..recipes.footprints import extract_footprints

    benchmarks = {name: _samples(path) for name, path in args.benchmark}
    backend = open_backend(args)
    saes = open_saes(args, backend, args.layers)
    summary = {}
    for name, samples in benchmarks.items():
        store = extract_footprints(
            backend,
            saes,
            samples,
            args.store,
            name,
            template=args.template,
            id_field=args.id_field,
            position=args.position,
            skip_first_token=not args.keep_first_token,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
        sizes = {layer: int(np.unique(store.footprints(layer).indices).size) for layer in store.config.layers}
        summary[name] = {"samples": store.config.n_samples, "directory": str(store.directory), "footprint_size": sizes}
    if args.json:
        emit(args, json.dumps(summary, indent=2))
    else:
        lines = [f"{n}: {s['samples']} samples -> {s['directory']}; |F(D)| {s['footprint_size']}" for n, s in summary.items()]
        emit(args, "\n".join(lines))
    return 0
