"""``qscope steer``: baseline vs steered generation with one or more SAE features.

Also home of the model/SAE/prompt options that ``qscope features`` and ``qscope contrast`` share.
Everything is validated (model, layer, SAE width and features, prompts) before anything is
generated, and output is written only once complete, so bad input leaves no output behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..backends import KINDS, Backend, Sampling, load_backend


# ---- options shared by the feature commands ----------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model hub id or local checkpoint directory")
    parser.add_argument("--sae", required=True, help="SAE repo id, SAELens release, directory or layer file")
    parser.add_argument("--k", type=int, help="Top-k size, when neither the SAE's name (L0_{k}) nor its files say")
    parser.add_argument("--backend", choices=sorted(KINDS), default="hf", help="framework that runs the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model dtype (SAE math is float32 regardless)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--output", type=Path, help="write the result to this file (atomically) instead of stdout")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def open_backend(args: argparse.Namespace) -> Backend:
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its weight-loading bar too
    return load_backend(args.model, args.backend, device=args.device, dtype=getattr(torch, args.dtype))


def open_saes(args: argparse.Namespace, backend: Backend, layers: list[int], features: list[int] | None = None) -> dict:
    """``{layer: SAE}`` checked against ``backend`` (only ``features`` are read when given)."""
    from ..sae import load_sae

    saes = {}
    for layer in layers:
        backend.check_layer(layer)
        sae = load_sae(args.sae, layer, k=args.k, device=args.device, features=features)
        backend.check_sae(sae, layer)
        saes[layer] = sae
    return saes


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a file: one per line, or for ``.jsonl`` one JSON string / ``{"text"|"prompt": ...}`` per line.

    Blank lines are skipped; a file with no text is an error.
    """
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(lines, 1):
            item = json.loads(line)
            text = item if isinstance(item, str) else item.get("text", item.get("prompt"))
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i}: expected a JSON string or an object with 'text' or 'prompt'")
            texts.append(text)
        lines = texts
    if not lines:
        raise ValueError(f"{path} holds no texts")
    return lines


def emit(args: argparse.Namespace, text: str) -> None:
    """Print ``text`` or write it to ``--output`` atomically (temp file + rename)."""
    if args.output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    target = args.output.resolve()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- qscope steer ------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("steer", help="generate with and without steering by SAE features",
                              description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--layer", type=int, required=True, help="decoder layer n (0-based) the SAE reads")
    p.add_argument("--feature", type=int, action="append", required=True, help="feature id (repeatable)")
    p.add_argument("--alpha", type=float, action="append",
                   help="strength per --feature (one value applies to all; negative suppresses)")
    p.add_argument("--clamp", type=float, metavar="VALUE",
                   help="instead of adding directions, set the features' SAE activations to VALUE (0 ablates)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    source.add_argument("--prompts-file", help="one prompt per line (.jsonl: JSON strings or {'prompt': ...})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--positions", default="all", help="prompt positions to steer: 'all', 'none', '0,2,5-8', '-1'")
    p.add_argument("--prompt-only", action="store_true", help="do not steer generated tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipes.steering import additive, clamp, steer

    prompts = read_texts(args.prompts_file) if args.prompts_file else args.prompt
    if args.clamp is None and not args.alpha:
        raise ValueError("give --alpha (additive steering) or --clamp VALUE")
    backend = open_backend(args)
    backend.encode(prompts)  # empty prompts fail here, before any model work
    sae = open_saes(args, backend, [args.layer], None if args.clamp is not None else args.feature)[args.layer]
    where = dict(layer=args.layer, positions=args.positions, generated=not args.prompt_only)
    if args.clamp is not None:
        intervention = clamp(sae, args.feature, args.clamp, **where)
    else:
        intervention = additive(sae, args.feature, args.alpha if len(args.alpha) > 1 else args.alpha[0], **where)
    sampling = Sampling(args.sample, args.temperature, args.top_k, args.top_p, args.seed if args.sample else None)
    run_kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, batch_size=args.batch_size,
                  progress=not args.no_progress)
    baseline = steer(backend, prompts, [], **run_kw)
    steered = steer(backend, prompts, intervention, **run_kw)
    result = {
        "model": args.model, "sae": args.sae, "layer": args.layer, "features": args.feature,
        "alpha": args.alpha, "clamp": args.clamp, "backend": args.backend,
        "baseline": [g.to_dict() for g in baseline], "steered": [g.to_dict() for g in steered],
    }
    if args.json:
        emit(args, json.dumps(result, ensure_ascii=False))
    else:
        blocks = [f"### prompt {i}: {p!r}\n--- baseline\n{b.text}\n--- steered\n{s.text}\n"
                  for i, (p, b, s) in enumerate(zip(prompts, baseline, steered))]
        emit(args, "\n".join(blocks))
    return 0
