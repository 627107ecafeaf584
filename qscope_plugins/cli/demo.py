"""``qscope demo``: the report's experiments in miniature on the shipped nano model, offline."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from ._options import add_json, add_output_dir, deprecated, output_dir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run every recipe on the bundled nano Qwen3 and its SAEs (offline, CPU, minutes)",
        description="Steering away from code-switching, a toxicity classifier and benchmark redundancy, on a tiny "
                    "Qwen3 trained here with Qwen-Scope-format SAEs; writes summary.json and PNG plots.",
    )
    add_json(parser, "print only the summary, as one JSON object on stdout")
    add_output_dir(parser, "directory for summary.json and the plots (default: ./qscope-demo)",
                   default=Path("qscope-demo"))
    deprecated(parser, "--out", "--output-dir", "output_dir", type=Path)
    parser.add_argument("--no-files", action="store_true", help="write nothing to disk")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test on a fifth of the held-out data (faster, noisier numbers)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.run import DemoSizes, run_demo

    quiet = args.json
    if not args.no_files:
        output_dir(args.output_dir)

    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)

    sizes = DemoSizes.quick() if args.quick else DemoSizes()
    with contextlib.redirect_stdout(sys.stderr):  # libraries print while loading; stdout is the summary's
        summary = run_demo(None if args.no_files else args.output_dir, sizes=sizes, say=say, progress=not quiet)
    if args.json:
        print(json.dumps(summary))
        return 0
    cs = summary["code_switch"]
    print(f"SAE explained variance (held-out), min over layers: {summary['sae_explained_variance_min']:.4f}")
    print(f"code-switching, {cs['prompts']} prompts: {summary['code_switch_rate_before']:.3f} -> "
          f"{summary['code_switch_rate_after']:.3f} (clamp layer {cs['layer']} features {cs['features']}), "
          f"perplexity ratio on monolingual text {summary['perplexity_ratio']:.4f}")
    print(f"toxicity OR-rule classifier, held-out F1: {summary['classifier_f1']:.3f} "
          f"(layer {summary['classifier']['layer']}, features {summary['classifier']['features']})")
    print(f"benchmark redundancy, Spearman rho(R_hat, R) over {len(summary['redundancy']['benchmarks'])} "
          f"benchmarks: {summary['redundancy_spearman']:.3f} (layer {summary['redundancy']['layer']})")
    print(f"backends agree (HookedTransformer vs nnsight greedy): {summary['backends_agree']}; "
          f"{summary['seconds']:.0f} s on {summary['device']}")
    if not args.no_files:
        print(f"wrote {args.output_dir}/summary.json and plots")
    return 0
