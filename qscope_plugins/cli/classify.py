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
import sys
from pathlib import Path

from ..distributed import command_world
from ._inputs import check_sources, open_backend, open_saes, read_texts
from ._options import (
    UsageError, add_first_token, add_layer, add_layers, add_model_options, add_top, as_usage_errors, check_context,
    deprecated, emit, finite_float, fraction, input_file, non_negative_int, output_file, positive_int, resolve_layers,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "classify", help="SAE-feature classifiers: fit, evaluate, apply", description=__doc__.split("\n\n")[0]
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    fit = actions.add_parser("fit", help="discover features on positive/negative texts and save a classifier")
    add_model_options(fit, json_help="print the full result (classifier, evaluation, tables) as JSON on stdout",
                      output=False)
    fit.add_argument("--pos", required=True, help="positive texts (one per line, or .jsonl)")
    fit.add_argument("--neg", required=True, help="negative texts")
    add_layers(fit, default="all", help="layers to scan (default: all)")
    add_top(fit, 5, "features in the classifier (the report uses 1, 2, 5, 10)")
    deprecated(fit, "--top-k", "--top", "top", type=positive_int)
    add_layer(fit, help="use this layer instead of the top1-diff choice")
    fit.add_argument("--compose", type=positive_int, metavar="M", help="OR the best feature of each of the top-M layers")
    fit.add_argument("--eval-pos", help="held-out positive texts (F1 per layer and K, baselines)")
    fit.add_argument("--eval-neg", help="held-out negative texts")
    fit.add_argument("--k-grid", default="1,2,5,10", help="K values for the F1 table")
    fit.add_argument(
        "--baselines", action="store_true", help="also evaluate weighted, random-feature and linear-probe baselines"
    )
    fit.add_argument("--plot", type=Path, help="PNG heatmap of held-out F1 per layer and K")
    fit.add_argument("--output", type=Path, metavar="PATH", help="classifier JSON to write (required)")
    deprecated(fit, "--save", "--output", "output", type=Path)
    _add_common(fit)
    fit.set_defaults(func=run_fit)

    ev = actions.add_parser("eval", help="evaluate a classifier, or cross-lingual transfer with --lang")
    add_model_options(ev)
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
    add_layers(ev, help="layers for transfer mode")
    add_top(ev, 5, "features per discovered classifier (transfer mode)")
    deprecated(ev, "--top-k", "--top", "top", type=positive_int)
    ev.add_argument("--fpr", type=fraction, default=0.05, help="false-positive rate for the TPR column")
    ev.add_argument("--n-boot", type=non_negative_int, default=1000, help="bootstrap resamples for the F1 interval")
    ev.add_argument("--plot", type=Path, help="PNG transfer heatmap (one per layer: NAME_layer{n}.png)")
    _add_common(ev)
    ev.set_defaults(func=run_eval)

    ap = actions.add_parser("apply", help="flag texts (or generations, with --monitor)")
    add_model_options(ap, json_help="print a JSON list (default: one JSON object per line)")
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--texts", required=True, help="texts (or prompts with --monitor)")
    ap.add_argument("--monitor", action="store_true", help="generate from each text and flag the generation")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    ap.set_defaults(func=run_apply)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eps", type=finite_float, default=0.0, help="a feature fires when its max activation exceeds eps")
    add_first_token(p)


def _acts(args, backend, saes, texts, skip_first_token, world=None):
    from ..distributed import SINGLE
    from ..recipes.classifier_run import example_activations

    world = world or SINGLE
    progress = not args.no_progress and world.is_main
    return example_activations(
        backend, saes, texts, skip_first_token=skip_first_token, batch_size=args.batch_size, progress=progress,
        world=world,
    )


def _load_classifier(path: Path):
    from ..recipes import classifier as clf

    input_file(path, "--classifier")
    try:
        return clf.FeatureClassifier.load(path)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"--classifier {path}: not a classifier saved by `qscope classify fit` ({err})") from None


def _revision(saes) -> str | None:
    return getattr(next(iter(saes.values())).cfg.metadata, "sae_revision", None)


# ---- fit ---------------------------------------------------------------------------------------
def run_fit(args: argparse.Namespace) -> int:
    if args.output is None:
        raise UsageError("give --output PATH for the classifier JSON")
    if (args.eval_pos is None) != (args.eval_neg is None):
        raise UsageError("give both --eval-pos and --eval-neg, or neither")
    if args.layer is not None and args.compose:
        raise UsageError("give --layer or --compose, not both")
    try:
        grid = [int(k) for k in args.k_grid.split(",")]
    except ValueError:
        raise UsageError(f"--k-grid {args.k_grid!r}: expected comma-separated positive integers, e.g. 1,2,5,10") from None
    if not grid or min(grid) < 1:
        raise UsageError(f"--k-grid {args.k_grid!r}: expected comma-separated positive integers, e.g. 1,2,5,10")
    if args.baselines and args.eval_pos is None:
        raise UsageError("--baselines needs held-out texts (--eval-pos and --eval-neg)")
    if args.plot and args.eval_pos is None:
        raise UsageError("--plot needs held-out texts (--eval-pos and --eval-neg)")
    texts = {flag: read_texts(path, flag) for flag, path in
             (("--pos", args.pos), ("--neg", args.neg), ("--eval-pos", args.eval_pos), ("--eval-neg", args.eval_neg))
             if path is not None}
    output_file(args.output)
    output_file(args.plot, "--plot")
    check_sources(args, args.layers)
    with command_world(args, "classify fit") as world:
        return _fit(args, texts, grid, world)


def _fit(args: argparse.Namespace, texts: dict[str, list[str]], grid: list[int], world) -> int:
    """``classify fit`` after validation; under a launcher every rank captures its share of the texts and
    rank 0 alone writes and reports."""
    from ..recipes import classifier as clf
    from ..recipes import classifier_eval as cev

    import numpy as np

    skip = args.skip_first_token
    backend = open_backend(args)
    with as_usage_errors():
        for flag, group in texts.items():
            check_context(backend, group, source=flag)
        layers = resolve_layers(args.layers, backend.n_layers)
        if args.layer is not None and args.layer not in layers:
            raise UsageError(f"--layer {args.layer} is not among the scanned layers {layers}")
    saes = open_saes(args, backend, layers)
    pos, neg = (_acts(args, backend, saes, texts[flag], skip, world) for flag in ("--pos", "--neg"))
    if args.eval_pos:
        test_pos, test_neg = (_acts(args, backend, saes, texts[flag], skip, world) for flag in ("--eval-pos", "--eval-neg"))
    if not world.is_main:
        return 0
    deltas = clf.layer_deltas(pos, neg, args.eps)
    meta = dict(model=args.model, sae_source=args.sae, sae_revision=_revision(saes), skip_first_token=skip)
    if args.compose:
        model = clf.compose_layers(deltas, args.compose, args.eps, **meta)
    else:
        layer = args.layer if args.layer is not None else clf.select_layer(deltas)
        if layer not in deltas:
            raise ValueError(f"--layer {layer} is not among the scanned layers {sorted(deltas)}")
        model = clf.fit(pos[layer], neg[layer], top_k=args.top, eps=args.eps, layer=layer, **meta)
    result = {"top1_diff": clf.top1_diff(deltas), "classifier": model.to_dict()}
    if args.eval_pos:
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
    model.save(args.output.expanduser().resolve())
    text = json.dumps(result, indent=2) if args.json else _fit_text(result, args.output)
    sys.stdout.write(text + "\n")
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
    import numpy as np

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
        raise UsageError("give either --classifier with --pos/--neg, or --lang (transfer mode)")
    output_file(args.output)
    if args.classifier is not None:
        if not (args.pos and args.neg):
            raise UsageError("--classifier needs --pos and --neg")
        model = _load_classifier(args.classifier)
        texts = [read_texts(args.pos, "--pos"), read_texts(args.neg, "--neg")]
        check_sources(args, sorted(set(model.layers)))
        with command_world(args, "classify eval") as world:
            backend = open_backend(args)
            with as_usage_errors():
                for flag, group in zip(("--pos", "--neg"), texts):
                    check_context(backend, group, source=flag)
            saes = open_saes(args, backend, sorted(set(model.layers)))
            pos, neg = (_acts(args, backend, saes, t, model.skip_first_token, world) for t in texts)
        if not world.is_main:
            return 0
        result = cev.evaluate(model, pos, neg, fpr=args.fpr, n_boot=args.n_boot).to_dict()
    else:
        if not args.layers:
            raise UsageError("transfer mode needs --layers")
        names = [name for name, *_ in args.lang]
        if len(set(names)) != len(names):
            raise UsageError(f"--lang names must differ, got {names}")
        texts = {name: [read_texts(f, f"--lang {name}") for f in files] for name, *files in args.lang}
        output_file(args.plot, "--plot")
        check_sources(args, args.layers)
        with command_world(args, "classify eval") as world:
            backend = open_backend(args)
            with as_usage_errors():
                layers = resolve_layers(args.layers, backend.n_layers)
                for name, group in texts.items():
                    for t in group:
                        check_context(backend, t, source=f"--lang {name}")
            saes = open_saes(args, backend, layers)
            skip = args.skip_first_token
            acts = {name: [_acts(args, backend, saes, t, skip, world) for t in group] for name, group in texts.items()}
        if not world.is_main:
            return 0
        result = {"languages": list(acts), "layers": {}}
        for layer in layers:
            discovery = {name: (a[0][layer], a[1][layer]) for name, a in acts.items()}
            held_out = {name: (a[2][layer], a[3][layer]) for name, a in acts.items()}
            names, _, f1 = cev.transfer_matrix(discovery, held_out, top_k=args.top, eps=args.eps)
            jaccard = cev.top_feature_jaccard({n: clf.feature_deltas(*d, args.eps) for n, d in discovery.items()}, k=10)
            result["layers"][layer] = {"transfer_f1": f1.tolist(), "top10_jaccard": jaccard.tolist()}
            if args.plot:
                from ._eval_plots import heatmap

                path = args.plot.with_name(f"{args.plot.stem}_layer{layer}{args.plot.suffix}")
                heatmap(f1, names, names, path, f"Transfer F1, layer {layer} (rows: discovery)", "F1")
    emit(args, result, _eval_text(result))
    return 0


def _eval_text(result: dict) -> str:
    if "languages" not in result:
        interval = f" [{result['f1_low']:.3f}, {result['f1_high']:.3f}]" if result.get("f1_low") is not None else ""
        return f"F1 {result['f1']:.3f}{interval}, precision {result['precision']:.3f}, recall {result['recall']:.3f}"
    names = result["languages"]
    lines = []
    for layer, row in result["layers"].items():
        lines.append(f"layer {layer}: transfer F1 (rows: discovery, columns: evaluation) over {', '.join(names)}")
        lines += ["  " + " ".join(f"{v:.3f}" for v in values) for values in row["transfer_f1"]]
    return "\n".join(lines)


# ---- apply -------------------------------------------------------------------------------------
def run_apply(args: argparse.Namespace) -> int:
    from ..recipes.classifier_run import apply, monitor

    model = _load_classifier(args.classifier)
    texts = read_texts(args.texts, "--texts")
    output_file(args.output)
    check_sources(args, sorted(set(model.layers)))
    backend = open_backend(args)
    with as_usage_errors():
        check_context(backend, texts, source="--texts", reserve=args.max_new_tokens if args.monitor else 0)
    saes = open_saes(args, backend, sorted(set(model.layers)))
    if args.monitor:
        results = monitor(backend, model, saes, texts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        rows = [r.to_dict() for r in results]
    else:
        out = apply(backend, model, saes, texts, batch_size=args.batch_size, progress=not args.no_progress)
        rows = [{"text": t, "score": float(s), "flagged": bool(p)} for t, s, p in zip(texts, out.scores, out.predictions)]
    emit(args, rows, "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return 0
