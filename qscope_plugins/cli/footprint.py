"""``qscope footprint``: benchmark feature footprints into a resumable sparse store.

Re-running the same command after an interruption resumes from the last completed batch. Launched
with ``torchrun`` / ``accelerate launch``, the batches are shared out over the ranks and the store is
byte-identical to a single-process run (docs/scaling.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._inputs import check_sources, open_backend, open_saes, read_texts
from ._options import (
    UsageError, add_first_token, add_layers, add_model_options, as_usage_errors, check_context, emit, input_file, output_dir,
    output_file, resolve_layers,
)


def parse_benchmark(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {value!r}")
    return name, Path(path)


def add_named_files(p: argparse.ArgumentParser, flag: str, help: str, **kwargs) -> None:
    """A repeatable ``FLAG NAME=FILE`` option, parsed to ``[(name, path), ...]``."""
    p.add_argument(flag, type=parse_benchmark, action="append", metavar="NAME=FILE", help=help, **kwargs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "footprint",
        help="SAE feature footprints of benchmarks (sparse, resumable store)",
        description=__doc__.split("\n\n")[0],
    )
    add_model_options(p)
    add_layers(p, required=True, help="decoder layers (one forward pass serves all)")
    add_named_files(p, "--benchmark", "benchmark samples: .jsonl records or one text per line (repeatable)",
                    required=True)
    p.add_argument("--store", type=Path, required=True, help="store directory (one sub-directory per benchmark)")
    p.add_argument("--template", default="{text}", help="prompt template over the record fields, e.g. 'Q: {question}\\nA:'")
    p.add_argument("--id-field", help="record field holding the sample id (default: line number from 0)")
    p.add_argument(
        "--position",
        choices=("last", "any", "all"),
        default="last",
        help="last token (the report), any token, or all tokens with counts",
    )
    add_first_token(p)
    p.add_argument("--overwrite", action="store_true", help="discard an existing store for these benchmarks")
    p.set_defaults(func=run)


def _samples(path: Path, name: str) -> list:
    from ..recipes.footprints import read_jsonl

    flag = f"--benchmark {name}="
    input_file(path, flag)
    with as_usage_errors():
        return read_jsonl(path) if path.suffix == ".jsonl" else read_texts(path, flag)


def _check(args: argparse.Namespace) -> dict[str, list]:
    from ..recipes.footprints import render

    names = [name for name, _ in args.benchmark]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"benchmark {twice[0]!r} is given twice")
    benchmarks = {name: _samples(path, name) for name, path in args.benchmark}
    for samples in benchmarks.values():
        with as_usage_errors():
            render(samples, args.template, args.id_field)  # template fields and ids, before any model work
    output_dir(args.store, "--store")
    output_file(args.output)
    check_sources(args, args.layers)
    return benchmarks


def run(args: argparse.Namespace) -> int:
    from ..distributed import command_world

    benchmarks = _check(args)
    with command_world(args, "footprint") as world:
        return _run(args, benchmarks, world)


def _run(args: argparse.Namespace, benchmarks: dict[str, list], world) -> int:
    import numpy as np

    from ..recipes.footprints import extract_footprints, render

    backend = open_backend(args)
    with as_usage_errors():
        layers = resolve_layers(args.layers, backend.n_layers)
        for name, samples in benchmarks.items():
            check_context(backend, render(samples, args.template, args.id_field)[1], source=f"--benchmark {name}")
    saes = open_saes(args, backend, layers)
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
            skip_first_token=args.skip_first_token,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            world=world,
        )
        if world.is_main:
            sizes = {layer: int(np.unique(store.footprints(layer).indices).size) for layer in store.config.layers}
            summary[name] = {"samples": store.config.n_samples, "directory": str(store.directory), "footprint_size": sizes}
    if world.is_main:
        lines = [f"{n}: {s['samples']} samples -> {s['directory']}; |F(D)| {s['footprint_size']}" for n, s in summary.items()]
        emit(args, summary, "\n".join(lines))
    return 0
