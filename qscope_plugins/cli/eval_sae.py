"""``qscope eval-sae``: per-layer SAE quality (EV/FVU, L0, dead/dense features, CE loss recovered).

With ``--compare-model`` the same SAEs are measured on a second checkpoint (e.g. base vs
post-trained) side by side, plus the Jaccard overlap of each text's top features. Everything is
validated and computed before anything is written; JSON and PNG are written atomically. Under
``torchrun`` / ``accelerate launch`` the batches are shared out over the ranks and the sums folded in
batch order: the same metrics, bit for bit (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._inputs import check_model_source, check_sources, open_backend, open_saes, read_texts, require_hub
from ._options import (
    UsageError, add_first_token, add_layers, add_model_options, add_top, as_usage_errors, deprecated, emit, fraction,
    looks_like_path, output_file, positive_int, resolve_layers, warn,
)

METRICS = ("explained_variance", "ce_loss_recovered", "dead_fraction", "dense_fraction")
DENSE_THRESHOLD = 0.1  # == recipes.sae_eval.DENSE_THRESHOLD (kept here so --help imports no torch; a test checks)


class _JsonFlag(argparse.Action):
    """``--json`` prints JSON; the old ``--json PATH`` still writes PATH (deprecated: use ``--output``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            namespace.json = True
            return
        warn(parser.prog, "--json PATH is deprecated; use --output PATH (and --json to print JSON)")
        namespace.output, namespace.json_path = Path(values), True


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval-sae", help="SAE quality per layer: EV/FVU, L0, dead features, CE loss recovered",
                              description=__doc__.split("\n\n")[0])
    add_model_options(p, json_help=None)
    p.add_argument("--json", nargs="?", action=_JsonFlag, default=False, metavar="",
                   help="print the results as JSON on stdout")
    add_layers(p, required=True)
    p.add_argument("--data", required=True,
                   help="texts: a file (one per line, or .jsonl), a datasets.save_to_disk directory, or a dataset id")
    p.add_argument("--column", default="text", help="dataset column holding the texts")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--max-texts", type=positive_int, help="use only the first N texts")
    p.add_argument("--max-length", type=positive_int, default=512,
                   help="truncate each text to this many tokens (longer texts are cut, with a warning)")
    add_first_token(p)
    p.add_argument("--no-loss", action="store_true", help="skip the next-token loss (reconstruction metrics only)")
    p.add_argument("--dense-threshold", type=fraction, default=DENSE_THRESHOLD,
                   help="a feature active on more than this fraction of tokens is dense")
    p.add_argument("--compare-model", help="a second checkpoint (e.g. the post-trained one) to compare with --model")
    add_top(p, 20, "top features per text for the Jaccard overlap")
    deprecated(p, "--top-n", "--top", "top", type=positive_int)
    p.add_argument("--plot", type=Path, help="write a per-layer PNG plot")
    p.set_defaults(func=run, json_path=False)


def read_data(spec: str, column: str = "text", split: str = "train", limit: int | None = None) -> list[str]:
    """Texts from a file, a ``save_to_disk`` directory or a dataset id (``load_dataset``)."""
    path = Path(spec).expanduser()
    if not path.exists() and (path.suffix or looks_like_path(spec)):
        raise UsageError(f"--data {spec}: no such file or directory")
    if path.is_file():
        texts = read_texts(path, "--data")
    else:
        if not path.exists():
            require_hub(spec, "README.md", "--data", repo_type="dataset")
        import datasets

        data = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(spec, split=split)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UsageError(f"{spec}: no split {split!r} (has {', '.join(data)})")
            data = data[split]
        if column not in data.column_names:
            raise UsageError(f"{spec}: no column {column!r} (has {', '.join(data.column_names)}); pass --column")
        texts = [t for t in data[column] if isinstance(t, str) and t.strip()]
    texts = texts[:limit] if limit else texts
    if not texts:
        raise UsageError(f"{spec} holds no texts")
    return texts


def plot(rows: dict[str, list[dict]], path: Path, title: str, jaccard: list[float] | None = None) -> Path:
    """EV, CE recovered, dead and dense fractions per layer; one line style per checkpoint (+ Jaccard)."""
    from ._eval_plots import _figure, _save

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for style, (name, metrics) in zip(("-o", "--s"), rows.items()):
        layers = [m["layer"] for m in metrics]
        for i, key in enumerate(METRICS):
            values = [m[key] if m[key] is not None else float("nan") for m in metrics]
            ax.plot(layers, values, style, color=f"C{i}", label=f"{key} ({name})" if len(rows) > 1 else key)
    layers = [m["layer"] for m in next(iter(rows.values()))]
    if jaccard is not None:
        ax.plot(layers, jaccard, ":^", color="k", label="top-feature Jaccard")
    ax.set(title=title, xlabel="layer", ylabel="value", ylim=(-0.02, 1.02))
    ax.set_xticks(layers)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _table(metrics: list[dict]) -> str:
    head = f"{'layer':>5} {'EV':>7} {'FVU':>7} {'cos':>6} {'L0':>7} {'dead':>6} {'dense':>6} {'CE clean':>9} {'CE sae':>8} {'CE rec':>7}"
    lines = [head]
    for m in metrics:
        ce = [m[k] for k in ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_recovered")]
        ce_text = " ".join(f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}" for v, w in zip(ce, (9, 8, 7)))
        lines.append(f"{m['layer']:>5} {m['explained_variance']:>7.4f} {m['fvu']:>7.4f} {m['cosine']:>6.3f} "
                     f"{m['l0']:>7.2f} {m['dead_fraction']:>6.3f} {m['dense_fraction']:>6.3f} {ce_text}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..distributed import command_world

    if args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2 (next-token loss needs two tokens), got {args.max_length}")
    output_file(args.output)
    output_file(args.plot, "--plot")
    if args.compare_model:
        check_model_source(args.compare_model, "--compare-model")
    check_sources(args, args.layers)
    texts = read_data(args.data, args.column, args.split, args.max_texts)
    with command_world(args, "eval-sae") as world:
        return _run(args, texts, world)


def _run(args: argparse.Namespace, texts: list[str], world) -> int:
    from ..recipes.sae_eval import compare_checkpoints, evaluate_sae

    backend = open_backend(args)
    with as_usage_errors():
        layers = resolve_layers(args.layers, backend.n_layers)
    saes = open_saes(args, backend, layers)
    max_length = _warn_truncation(backend, texts, args.max_length, world.is_main)
    options = dict(skip_first_token=args.skip_first_token, compute_loss=not args.no_loss, batch_size=args.batch_size,
                   max_length=max_length, dense_threshold=args.dense_threshold,
                   progress=not args.no_progress and world.is_main, world=world)
    result = {"model": args.model, "sae": args.sae, "backend": args.backend, "n_texts": len(texts),
              "skip_first_token": args.skip_first_token}
    if args.compare_model:
        other = open_backend(args, args.compare_model)
        compared = compare_checkpoints(backend, other, saes, texts, top_n=args.top, **options)
        result |= {"compare_model": args.compare_model, "top_n": args.top,
                   "layers": [{"layer": layer, **row} for layer, row in compared.items()]}
        series = {"model": [r["base"] for r in result["layers"]], "compare": [r["other"] for r in result["layers"]]}
        text = "\n\n".join(f"{name}: {model}\n{_table(series[name])}" for name, model in
                           (("model", args.model), ("compare", args.compare_model)))
        text += "\n\ntop-feature Jaccard: " + ", ".join(
            f"layer {r['layer']}: {r['top_feature_jaccard']:.3f}" for r in result["layers"])
    else:
        evaluated = evaluate_sae(backend, saes, texts, **options)
        result["layers"] = [e.to_dict() for e in evaluated.values()]
        series = {"model": result["layers"]}
        text = _table(result["layers"])
    if not world.is_main:  # every rank holds the same result; one reports it
        return 0
    if args.plot:
        jaccard = [r["top_feature_jaccard"] for r in result["layers"]] if args.compare_model else None
        plot(series, args.plot, f"{Path(args.sae).name} on {Path(args.model).name}", jaccard)
    emit(args, result, text)
    return 0


def _warn_truncation(backend, texts: list[str], max_length: int, say: bool = True) -> int:
    """eval-sae truncates (to ``--max-length``, at most the model's context) and says so."""
    context = getattr(getattr(getattr(backend, "model", None), "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and max_length > context:
        max_length = context
    cut = sum(len(ids) > max_length for ids in backend.encode(texts))
    if cut and say:
        print(f"qscope eval-sae: warning: {cut} of {len(texts)} texts are longer than {max_length} tokens "
              "(--max-length, at most the model's context) and are truncated", file=sys.stderr)
    return max_length
