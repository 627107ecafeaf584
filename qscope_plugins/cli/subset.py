"""``qscope subset``: pick the n samples of a benchmark that cover the most SAE features (greedy).

With ``--scores`` the model ranking on the chosen subset is compared with random subsets of the same size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._options import (
    UsageError, add_json, add_output, as_usage_errors, emit, input_file, non_negative_int, output_file, positive_int,
)
from .redundancy import add_store_arguments, open_store_dir, pick_layer


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "subset", help="max-coverage subset of a benchmark from its footprints", description=__doc__.split("\n\n")[0]
    )
    add_store_arguments(p)
    p.add_argument("--benchmark", required=True, help="benchmark name in the store")
    p.add_argument("--n", type=positive_int, required=True, help="number of samples to pick")
    p.add_argument("--scores", type=Path, help="per-sample model scores (.json or long .csv) for the ranking check")
    p.add_argument("--n-random", type=positive_int, default=200, help="random subsets to compare against")
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_json(p, "print the JSON result on stdout")
    add_output(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipes import redundancy as rd
    from ..recipes.footprints import read_scores

    output_file(args.output)
    if args.scores is not None:
        input_file(args.scores, "--scores")
    store = open_store_dir(args.store, [args.benchmark])[args.benchmark]
    layer = pick_layer({args.benchmark: store}, args.layer)
    if args.n > store.config.n_samples:
        raise UsageError(f"--n {args.n} is more than the {store.config.n_samples} samples of {args.benchmark}")
    selection = rd.greedy_max_coverage(store.footprints(layer).sets(), args.n)
    ids = store.config.sample_ids
    result = {
        "benchmark": args.benchmark,
        "layer": layer,
        "n": args.n,
        "sample_ids": [ids[i] for i in selection.indices],
        "coverage": selection.coverage.tolist(),
    }
    if args.scores:
        with as_usage_errors():
            _, scores = read_scores(args.scores, ids)
        ranking = rd.compare_ranking(scores, selection.indices, n_random=args.n_random, seed=args.seed)
        result["ranking"] = dict(ranking.__dict__)
    emit(args, result, _summary(result))
    return 0


def _summary(result: dict) -> str:
    line = f"{result['benchmark']} layer {result['layer']}: {result['n']} samples cover {result['coverage'][-1]:.1%} of F(D)"
    if "ranking" in result:
        r = result["ranking"]
        line += (
            f"; Kendall tau vs full ranking {r['tau']:.3f} (random subsets {r['random_mean']:.3f} ± {r['random_std']:.3f},"
            f" better than {r['percentile']:.0%} of them)"
        )
    return line + "\n" + " ".join(result["sample_ids"])
