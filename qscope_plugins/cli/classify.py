"""``qscope classify fit|eval|apply``: SAE-feature classifiers (the Qwen-Scope toxicity recipe).

``fit`` finds the features that fire more often on positive than on negative texts, picks a layer
(top1-diff, or ``--layer``) or composes layers (``--compose M``) and saves a small JSON classifier;
with held-out texts it also reports F1 per layer and K (and baselines). ``eval`` measures a saved
classifier, or with ``--lang`` the cross-lingual transfer matrix. ``apply`` flags texts, or with
``--monitor`` flags generations token by token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .steer import add_model_arguments, emit, open_backend, open_saes, read_texts


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "classify", help="SAE-feature classifiers: fit, evaluate, apply", description=__doc__.split("\n\n")[0]
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    fit = actions.add_parser("fit", help="discover features on positive/negative texts and save a classifier")
    add_model_arguments(fit)
    fit.add_argument("--pos", required=True, help="positive texts (one per line, or .jsonl)")
    fit.add_argument("--neg", required=True, help="negative texts")
    fit.add_argument("--layers", type=int, nargs="+", help="layers to scan (default: every layer)")
    fit.add_argument("--top-k", type=int, default=5, help="features per layer (the report uses 1, 2, 5, 10)")
    fit.add_argument("--layer", type=int, help="use this layer instead of the top1-diff choice")
    fit.add_argument("--compose", type=int, metavar="M", help="OR the best feature of each of the top-M layers")
    fit.add_argument("--eval-pos", help="held-out positive texts (F1 per layer and K, baselines)")
    fit.add_argument("--eval-neg", help="held-out negative texts")
    fit.add_argument("--k-grid", default="1,2,5,10", help="K values for the F1 table")
    fit.add_argument(
        "--baselines", action="store_true", help="also evaluate weighted, random-feature and linear-probe baselines"
    )
    fit.add_argument("--plot", type=Path, help="PNG heatmap of held-out F1 per layer and K")
    fit.add_argument("--save", type=Path, required=True, help="classifier JSON to write")
    _add_common(fit)
    fit.set_defaults(func=run_fit)

    ev = actions.add_parser("eval", help="evaluate a classifier, or cross-lingual transfer with --lang")
    add_model_arguments(ev)
    ev.add_argument("--classifier", type=Path, help="classifier JSON (from classify fit)")
    ev.add_argument("--pos", help="positive texts")
    ev.add_argument("--neg", help="negative texts")
    ev.add_argument(
        "--lang",
        nargs=5,
        action="append",
        metavar=("NAME", "DISC_POS", "DISC_NEG", "EVAL_POS", "EVAL_NEG"),
        help="a language's discovery and evaluation texts (repeatable; transfer mode)",
    )
    ev.add_argument("--layers", type=int, nargs="+", help="layers for transfer mode")
    ev.add_argument("--top-k", type=int, default=5)
    ev.add_argument("--fpr", type=float, default=0.05, help="false-positive rate for the TPR column")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the F1 interval")
    ev.add_argument("--plot", type=Path, help="PNG transfer heatmap (one per layer: NAME_layer{n}.png)")
    _add_common(ev)
    ev.set_defaults(func=run_eval)

    ap = actions.add_parser("apply", help="flag texts (or generations, with --monitor)")
    add_model_arguments(ap)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--texts", required=True, help="texts (or prompts with --monitor)")
    ap.add_argument("--monitor", action="store_true", help="generate from each text and flag the generation")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.set_defaults(func=run_apply)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eps", type=float, default=0.0, help="a feature fires when its max activation exceeds eps")
    p.add_argument("--keep-first-token", action="store_true", help="let the first token count (default: skipped)")


def _acts(args, backend, saes, path, skip_first_token):
    from ..recipes.classifier_run import example_activations

    texts = read_texts(path)
    progress = not args.no_progress
    return example_activations(
        backend, saes, texts, skip_first_token=skip_first_token, batch_size=args.batch_size, progress=progress
    )


def _revision(saes) -> str | None:
    return getattr(next(iter(saes.values())).cfg.metadata, "sae_revision", None)


# ---- fit ---------------------------------------------------------------------------------------
def run_fit(args: argparse.Namespace) -> int:
    from ..recipes import classifier as clf
    from ..recipes import classifier_eval as cev

    if (args.eval_pos is None) != (args.eval_neg is None):
        raise ValueError("give both --eval-pos and --eval-neg, or neither")
    grid = [int(k) for k in args.k_grid.split(",")]
    skip = not args.keep_first_token
    backend = open_backend(args)
    saes = open_saes(args, backend, args.layers if args.layers is not None else list(range(backend.n_layers)))
    pos, neg = (_acts(args, backend, saes, path, skip) for path in (args.pos, args.neg))
    deltas = clf.layer_deltas(pos, neg, args.eps)
    meta = dict(model=args.model, sae_source=args.sae, sae_revision=_revision(saes), skip_first_token=skip)
    if args.compose:
        model = clf.compose_layers(deltas, args.compose, args.eps, **meta)
    else:
        layer = args.layer if args.layer is not None else clf.select_layer(deltas)
        if layer not in deltas:
            raise ValueError(f"--layer {layer} is not among the scanned layers {sorted(deltas)}")
        model = clf.fit(pos[layer], neg[layer], top_k=args.top_k, eps=args.eps, layer=layer, **meta)
    result = {"top1_diff": clf.top1_diff(deltas), "classifier": model.to_dict()}
    if args.eval_pos:
        test_pos, test_neg = (_acts(args, backend, saes, path, skip) for path in (args.eval_pos, args.eval_neg))
        result["evaluation"] = cev.evaluate(model, test_pos, test_neg).to_dict()
        def held_out_f1(layer: int, k: int) -> float:
            candidate = clf.fit(pos[layer], neg[layer], top_k=k, eps=args.eps)
            return cev.evaluate(candidate, test_pos[layer], test_neg[layer], n_boot=0).f1

        table = np.array([[held_out_f1(n, k) for k in grid] for n in sorted(deltas)])
        result["f1_per_layer_and_k"] = {"layers": sorted(deltas), "k": grid, "f1": table.tolist()}
        if args.plot:
            from ._eval_plots import heatmap

            heatmap(table, sorted(deltas), grid, args.plot, "Held-out F1 per layer and K", "F1")
        if args.baselines:
            result["baselines"] = _baselines(args, backend, model, pos, neg, test_pos, test_neg, skip)
    model.save(args.save)
    emit(args, json.dumps(result, indent=2) if args.json else _fit_text(result, args.save))
    return 0


def _baselines(args, backend, model, pos, neg, test_pos, test_neg, skip) -> dict:
    """Weighted head, random features and a linear probe, all at the classifier's (first) layer."""
    from ..recipes import classifier as clf
    from ..recipes import classifier_eval as cev
    from ..recipes.capture import pooled_residuals

    layer = model.layers[0]
    weighted = clf.reweight(model, pos, neg)
    control = clf.random_control(pos[layer], neg[layer], top_k=len(model.features), eps=args.eps, layer=layer)
    residuals = [
        pooled_residuals(backend, read_texts(path), [layer], skip_first_token=skip, batch_size=args.batch_size)[layer]
        for path in (args.pos, args.neg, args.eval_pos, args.eval_neg)
    ]
    probe = clf.fit_linear_probe(residuals[0], residuals[1])
    truth = np.r_[np.ones(len(residuals[2])), np.zeros(len(residuals[3]))]
    probe_f1 = cev.binary_metrics(truth, probe.predict(np.vstack(residuals[2:])))["f1"]
    return {
        "weighted_f1": cev.evaluate(weighted, test_pos, test_neg, n_boot=0).f1,
        "random_features_f1": cev.evaluate(control, test_pos, test_neg, n_boot=0).f1,
        "linear_probe_f1": probe_f1,
    }


def _fit_text(result: dict, path: Path) -> str:
    c = result["classifier"]
    lines = [f"saved {path}: features {c['features']} at layers {c['layers']} (Delta {[round(d, 3) for d in c['deltas']]})"]
    if "evaluation" in result:
        e = result["evaluation"]
        lines.append(
            f"held-out F1 {e['f1']:.3f} [{e['f1_low']:.3f}, {e['f1_high']:.3f}], "
            f"precision {e['precision']:.3f}, recall {e['recall']:.3f}"
        )
    return "\n".join(lines)


# ---- eval --------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    from ..recipes import classifier as clf
    from ..recipes import classifier_eval as cev

    if (args.classifier is None) == (args.lang is None):
        raise ValueError("give either --classifier with --pos/--neg, or --lang (transfer mode)")
    backend = open_backend(args)
    if args.classifier is not None:
        if not (args.pos and args.neg):
            raise ValueError("--classifier needs --pos and --neg")
        model = clf.FeatureClassifier.load(args.classifier)
        saes = open_saes(args, backend, sorted(set(model.layers)))
        pos, neg = (_acts(args, backend, saes, path, model.skip_first_token) for path in (args.pos, args.neg))
        result = cev.evaluate(model, pos, neg, fpr=args.fpr, n_boot=args.n_boot).to_dict()
    else:
        if not args.layers:
            raise ValueError("transfer mode needs --layers")
        saes = open_saes(args, backend, args.layers)
        skip = not args.keep_first_token
        acts = {name: [_acts(args, backend, saes, f, skip) for f in files] for name, *files in args.lang}
        result = {"languages": list(acts), "layers": {}}
        for layer in args.layers:
            discovery = {name: (a[0][layer], a[1][layer]) for name, a in acts.items()}
            held_out = {name: (a[2][layer], a[3][layer]) for name, a in acts.items()}
            names, _, f1 = cev.transfer_matrix(discovery, held_out, top_k=args.top_k, eps=args.eps)
            jaccard = cev.top_feature_jaccard({n: clf.feature_deltas(*d, args.eps) for n, d in discovery.items()}, k=10)
            result["layers"][layer] = {"transfer_f1": f1.tolist(), "top10_jaccard": jaccard.tolist()}
            if args.plot:
                from ._eval_plots import heatmap

                path = args.plot.with_name(f"{args.plot.stem}_layer{layer}{args.plot.suffix}")
                heatmap(f1, names, names, path, f"Transfer F1, layer {layer} (rows: discovery)", "F1")
    emit(args, json.dumps(result, indent=2))
    return 0


# ---- apply -------------------------------------------------------------------------------------
def run_apply(args: argparse.Namespace) -> int:
    from ..recipes import classifier as clf
    from ..recipes.classifier_run import apply, monitor

    model = clf.FeatureClassifier.load(args.classifier)
    texts = read_texts(args.texts)
    backend = open_backend(args)
    saes = open_saes(args, backend, sorted(set(model.layers)))
    if args.monitor:
        results = monitor(backend, model, saes, texts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        rows = [r.to_dict() for r in results]
    else:
        out = apply(backend, model, saes, texts, batch_size=args.batch_size, progress=not args.no_progress)
        rows = [{"text": t, "score": float(s), "flagged": bool(p)} for t, s, p in zip(texts, out.scores, out.predictions)]
    emit(args, json.dumps(rows, indent=2) if args.json else "\n".join(json.dumps(r) for r in rows))
    return 0
