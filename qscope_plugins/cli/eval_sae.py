"""``qscope eval-sae``: per-layer SAE quality (EV/FVU, L0, dead/dense features, CE loss recovered).

With ``--compare-model`` the same SAEs are measured on a second checkpoint (e.g. base vs
post-trained) side by side, plus the Jaccard overlap of each text's top features. Everything is
validated and computed before anything is written; JSON and PNG are written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..backends import KINDS
from ..recipes.sae_eval import DENSE_THRESHOLD, LayerEval, compare_checkpoints, evaluate_sae
from ..sae.convert import parse_layers
from .steer import open_backend, open_saes, read_texts

METRICS = ("explained_variance", "ce_loss_recovered", "dead_fraction", "dense_fraction")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval-sae", help="SAE quality per layer: EV/FVU, L0, dead features, CE loss recovered",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model hub id or local checkpoint directory")
    p.add_argument("--sae", required=True, help="SAE repo id, SAELens release, directory or layer file")
    p.add_argument("--layers", required=True, type=parse_layers, help="layers, e.g. 12 or 0-5 or 0,4,8-10")
    p.add_argument("--data", required=True,
                   help="texts: a file (one per line, or .jsonl), a datasets.save_to_disk directory, or a dataset id")
    p.add_argument("--column", default="text", help="dataset column holding the texts")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--max-texts", type=int, help="use only the first N texts")
    p.add_argument("--max-length", type=int, default=512, help="truncate each text to this many tokens")
    p.add_argument("--k", type=int, help="Top-k size, when neither the SAE's name (L0_{k}) nor its files say")
    p.add_argument("--backend", choices=sorted(KINDS), default="hf", help="framework that runs the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-first-token", action="store_true", help="leave each text's first token out (extreme norm)")
    p.add_argument("--no-loss", action="store_true", help="skip the next-token loss (reconstruction metrics only)")
    p.add_argument("--dense-threshold", type=float, default=DENSE_THRESHOLD,
                   help="a feature active on more than this fraction of tokens is dense")
    p.add_argument("--compare-model", help="a second checkpoint (e.g. the post-trained one) to compare with --model")
    p.add_argument("--top-n", type=int, default=20, help="top features per text for the Jaccard overlap")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    p.add_argument("--plot", type=Path, help="write a per-layer PNG plot")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def read_data(spec: str, column: str = "text", split: str = "train", limit: int | None = None) -> list[str]:
    """Texts from a file, a ``save_to_disk`` directory or a dataset id (``load_dataset``)."""
    path = Path(spec).expanduser()
    if not path.exists() and (path.suffix or spec.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{spec}: no such file or directory")
    if path.is_file():
        texts = read_texts(path)
    else:
        import datasets

        data = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(spec, split=split)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{spec}: no split {split!r} (has {', '.join(data)})")
            data = data[split]
        if column not in data.column_names:
            raise ValueError(f"{spec}: no column {column!r} (has {', '.join(data.column_names)}); pass --column")
        texts = [t for t in data[column] if isinstance(t, str) and t.strip()]
    texts = texts[:limit] if limit else texts
    if not texts:
        raise ValueError(f"{spec} holds no texts")
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
    from ..recipes.footprint_store import atomic_write

    texts = read_data(args.data, args.column, args.split, args.max_texts)
    backend = open_backend(args)
    saes = open_saes(args, backend, args.layers)
    options = dict(skip_first_token=args.skip_first_token, compute_loss=not args.no_loss, batch_size=args.batch_size,
                   max_length=args.max_length, dense_threshold=args.dense_threshold, progress=not args.no_progress)
    result = {"model": args.model, "sae": args.sae, "backend": args.backend, "n_texts": len(texts),
              "skip_first_token": args.skip_first_token}
    if args.compare_model:
        other = open_backend(argparse.Namespace(**{**vars(args), "model": args.compare_model}))
        compared = compare_checkpoints(backend, other, saes, texts, top_n=args.top_n, **options)
        result |= {"compare_model": args.compare_model, "top_n": args.top_n,
                   "layers": [{"layer": layer, **row} for layer, row in compared.items()]}
        series = {"model": [r["base"] for r in result["layers"]], "compare": [r["other"] for r in result["layers"]]}
        text = "\n\n".join(f"{name}: {model}\n{_table(series[name])}" for name, model in
                           (("model", args.model), ("compare", args.compare_model)))
        text += "\n\ntop-feature Jaccard: " + ", ".join(
            f"layer {r['layer']}: {r['top_feature_jaccard']:.3f}" for r in result["layers"])
    else:
        evaluated: dict[int, LayerEval] = evaluate_sae(backend, saes, texts, **options)
        result["layers"] = [e.to_dict() for e in evaluated.values()]
        series = {"model": result["layers"]}
        text = _table(result["layers"])
    if args.plot:
        jaccard = [r["top_feature_jaccard"] for r in result["layers"]] if args.compare_model else None
        plot(series, args.plot, f"{Path(args.sae).name} on {Path(args.model).name}", jaccard)
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2))
    print(text)
    return 0
