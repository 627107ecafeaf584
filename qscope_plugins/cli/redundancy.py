"""``qscope redundancy``: redundancy and overlap tables (JSON/CSV) and plots from a footprint store.

Per benchmark: N, |F(D)|, R_hat (SAE-based) and, with ``--scores``, R (performance-based, with its
standard error). Across benchmarks: the asymmetric overlap matrix and, with scores for at least three
benchmarks, how R_hat tracks R (Spearman rho) and how overlap tracks performance similarity.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from ._options import (
    UsageError, add_json, add_layer, add_output_dir, as_usage_errors, deprecated, input_file, non_negative_int,
    output_dir, positive_int, write_atomic,
)
from .footprint import add_named_files


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("redundancy", help="benchmark redundancy (R_hat, R) and overlap from footprints",
                              description=__doc__.split("\n\n")[0])
    add_store_arguments(p)
    p.add_argument("--benchmarks", nargs="+", help="benchmarks to include (default: every finished one in the store)")
    add_named_files(p, "--scores", "per-sample model scores for a benchmark (.json or long .csv; repeatable)",
                    default=[])
    p.add_argument("--control", help="benchmark to partial out of performance similarity (the report uses MMLU)")
    p.add_argument("--n-subsets", type=positive_int, default=100, help="random orderings per benchmark for R")
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_output_dir(p, "write redundancy.json, CSV tables and PNG plots here")
    deprecated(p, "--out-dir", "--output-dir", "output_dir", type=Path)
    add_json(p, "print the JSON result on stdout")
    p.set_defaults(func=run)


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, required=True, help="footprint store directory (from qscope footprint)")
    add_layer(p, help="stored layer to use (default: the only one, else required)")


def pick_layer(stores, layer: int | None) -> int:
    """The layer every store holds: ``layer``, or the single stored one."""
    common = set.intersection(*(set(s.config.layers) for s in stores.values()))
    if layer is None:
        if len(common) != 1:
            raise UsageError(f"the stores share layers {sorted(common)}; choose one with --layer")
        return common.pop()
    if layer not in common:
        raise UsageError(f"layer {layer} is not stored for every benchmark (shared layers: {sorted(common)})")
    return layer


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def open_store_dir(root: Path, benchmarks=None) -> dict:
    """The finished stores under ``--store`` (missing, incomplete or unknown ones are usage errors)."""
    from ..recipes.footprint_store import open_stores

    if not root.is_dir():
        raise UsageError(f"--store {root}: no such directory")
    with as_usage_errors():
        return open_stores(root, benchmarks)


def run(args: argparse.Namespace) -> int:
    from scipy.stats import spearmanr

    from ..recipes import redundancy as rd
    from ..recipes.footprints import read_scores
    from . import _eval_plots as plots

    output_dir(args.output_dir)
    names_given = [name for name, _ in args.scores]
    if len(set(names_given)) != len(names_given):
        raise UsageError("--scores names a benchmark twice")
    for name, path in args.scores:
        input_file(path, f"--scores {name}=")
    stores = open_store_dir(args.store, args.benchmarks)
    layer = pick_layer(stores, args.layer)
    unknown = sorted(set(names_given) - set(stores))
    if unknown:
        raise UsageError(f"--scores names benchmarks not in the store: {', '.join(unknown)}")
    with as_usage_errors():
        scores = {name: read_scores(path, stores[name].config.sample_ids)[1] for name, path in args.scores}
    sets = {name: store.footprints(layer).sets() for name, store in stores.items()}

    table, curves = [], {}
    for name, samples in sets.items():
        curves[name] = rd.coverage_curve(samples)
        size = int(rd.footprint(samples).size)
        row = {"benchmark": name, "samples": len(samples), "footprint": size, "R_hat": float(curves[name].sum() / size)}
        row.update(R=None, R_se=None)
        if name in scores:
            perf = rd.performance_redundancy(scores[name], n_subsets=args.n_subsets, seed=args.seed)
            row.update(R=perf.R, R_se=perf.se)
        table.append(row)
    names = list(sets)
    overlap = rd.overlap_matrix(sets)
    result = {"layer": layer, "benchmarks": table, "overlap": {"rows_covered_by_columns": names, "matrix": overlap.tolist()}}
    scored = [row for row in table if row["R"] is not None]
    if len(scored) >= 3:
        rho = spearmanr([r["R_hat"] for r in scored], [r["R"] for r in scored]).statistic
        result["spearman_R_hat_vs_R"] = float(rho)
        scored_sets = {r["benchmark"]: sets[r["benchmark"]] for r in scored}
        pairs = rd.overlap_similarity_correlation(scored_sets, scores, control=args.control)
        result["overlap_vs_similarity"] = {
            "pairs": len(pairs.pairs),
            "pearson": pairs.pearson,
            "spearman": pairs.spearman,
            "control": args.control,
        }

    if args.output_dir:
        # every file is rendered in memory first, then each is written atomically
        overlap_rows = [{"benchmark": a, **dict(zip(names, overlap[i]))} for i, a in enumerate(names)]
        coverage_rows = [{"benchmark": n, "n": i + 1, "c_n": c} for n, cs in curves.items() for i, c in enumerate(cs)]
        files = {"redundancy.json": json.dumps(result, indent=2), "benchmarks.csv": _csv(table),
                 "overlap.csv": _csv(overlap_rows), "coverage.csv": _csv(coverage_rows)}
        title = f"Footprint overlap (layer {layer})"
        files["overlap.png"] = plots.heatmap(overlap, names, names, None, title, "|F(row) & F(col)| / |F(row)|")
        files["coverage.png"] = plots.curves(curves, None, "Expected feature coverage c_n", "subset size n / N", "c_n")
        if len(scored) >= 2:
            title = "R_hat vs R"
            if "spearman_R_hat_vs_R" in result:
                title += f" (Spearman rho = {result['spearman_R_hat_vs_R']:.2f})"
            x, y, labels = ([r[k] for r in scored] for k in ("R", "R_hat", "benchmark"))
            files["r_hat_vs_r.png"] = plots.scatter(x, y, labels, None, title, "R (performance-based)",
                                                    "R_hat (SAE-based)")
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(args.output_dir / name, data)
    if args.json or not args.output_dir:
        print(json.dumps(result, indent=2) if args.json else _text(result))
    return 0


def _text(result: dict) -> str:
    lines = [f"layer {result['layer']}"]
    for row in result["benchmarks"]:
        r = "" if row["R"] is None else f"  R={row['R']:.3f}±{row['R_se']:.3f}"
        lines.append(f"{row['benchmark']:>16}  N={row['samples']:<6} |F(D)|={row['footprint']:<6} R_hat={row['R_hat']:.4f}{r}")
    if "spearman_R_hat_vs_R" in result:
        lines.append(f"Spearman rho(R_hat, R) = {result['spearman_R_hat_vs_R']:.3f}")
    return "\n".join(lines)
