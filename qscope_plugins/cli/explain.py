"""``qscope explain``: explain features of an index with an LLM and score the explanations by detection.

``--explainer`` is an OpenAI-compatible endpoint you run (``http://127.0.0.1:8000/v1``: vLLM, TGI,
Ollama; name the served model with ``--explainer-model``; an API key is read from $OPENAI_API_KEY
if set) or a local ``transformers`` model (hub id or directory). Each result (explanation, balanced
accuracy on held-out activating vs silent contexts, explainer, prompt version, contexts used) is
stored in the index, where feature pages and ``qscope dashboard`` show it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._explorer import parse_features

from ._options import UsageError, device_name, positive_int, resolve_device

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="explain index features with an LLM (detection-scored)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, required=True, help="directory written by qscope index")
    p.add_argument("--features", nargs="+", required=True, metavar="L:F", help="e.g. 3:459 2:0-9")
    p.add_argument("--explainer", required=True,
                   help="an OpenAI-compatible base URL (http://host:port/v1) or a local transformers model")
    p.add_argument("--explainer-model", help="model name the endpoint serves (required with a URL)")
    p.add_argument("--device", type=device_name, default="auto", help="device of a local explainer (auto, cpu, cuda...)")
    p.add_argument("--n-explain", type=positive_int, default=10, help="top contexts shown to the explainer")
    p.add_argument("--n-random", type=positive_int, default=5, help="silent contexts shown to the explainer")
    p.add_argument("--n-detect", type=positive_int, default=10, help="held-out activating and silent contexts each")
    p.add_argument("--skip-done", action="store_true", help="leave features that already have an explanation")
    p.add_argument("--json", action="store_true", help="print one JSON object per feature")
    p.set_defaults(func=run)


def make_explainer(args: argparse.Namespace):
    from ..recipes.explain import LocalTransformers, OpenAICompatible

    if args.explainer.startswith(("http://", "https://")):
        if not args.explainer_model:
            raise UsageError("--explainer-model is required with an endpoint URL (the model name it serves)")
        return OpenAICompatible(args.explainer, args.explainer_model)
    return LocalTransformers(args.explainer, device=resolve_device(args.device))


def run(args: argparse.Namespace) -> int:
    from ..recipes.explain import explain_feature
    from ..recipes.feature_index import FeatureIndex

    index = FeatureIndex.open(args.index)
    features = parse_features(args.features, list(index.config.layers), index.config.d_sae)
    if min(args.n_explain, args.n_detect) < 1 or args.n_random < 0:
        raise ValueError("--n-explain and --n-detect must be >= 1, --n-random >= 0")
    explainer = make_explainer(args)
    failed = 0
    for layer, feature in features:
        if args.skip_done and index.explanation(layer, feature):
            continue
        try:
            record = explain_feature(index, layer, feature, explainer, n_explain=args.n_explain,
                                     n_random=args.n_random, n_detect=args.n_detect)
        except (RuntimeError, ValueError) as err:
            failed += 1
            print(f"qscope explain: error: layer {layer} feature {feature}: {err}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({k: record[k] for k in ("layer", "feature", "explanation", "score", "explainer")},
                             ensure_ascii=False))
        else:
            print(f"L{layer} #{feature} ({record['score']['balanced_accuracy']:.2f}): {record['explanation']}")
    return 1 if failed else 0
