"""``qscope steer``: baseline vs steered generation with one or more SAE features.

Also home of the model/SAE/prompt options that ``qscope features`` and ``qscope contrast`` share.
Everything is validated (model, layer, SAE width and features, prompts) before anything is
generated, and output is written only once complete, so bad input leaves no output behind.
"""

from __future__ import annotations

import argparse

from ._inputs import check_sources, open_backend, open_saes, read_texts
from ._options import (
    UsageError, add_json, add_layer, add_model_options, as_usage_errors, check_context, check_texts, emit,
    finite_float, non_negative_int, output_file, positive_int,
)

# Kept for callers of the old names (the helpers moved to ._options / ._inputs).
add_model_arguments = add_model_options
__all__ = ["add_json", "add_model_arguments", "emit", "open_backend", "open_saes", "read_texts"]


# ---- qscope steer ------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("steer", help="generate with and without steering by SAE features",
                              description=__doc__.split("\n\n")[0])
    add_model_options(p)
    add_layer(p, required=True, help="decoder layer n (0-based) the SAE reads")
    p.add_argument("--feature", type=non_negative_int, action="append", required=True, help="feature id (repeatable)")
    p.add_argument("--alpha", type=finite_float, action="append",
                   help="strength per --feature (one value applies to all; negative suppresses)")
    p.add_argument("--clamp", type=finite_float, metavar="VALUE",
                   help="instead of adding directions, set the features' SAE activations to VALUE (0 ablates)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    source.add_argument("--prompts-file", help="one prompt per line (.jsonl: JSON strings or {'prompt': ...})")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--positions", default="all", help="prompt positions to steer: 'all', 'none', '0,2,5-8', '-1'")
    p.add_argument("--prompt-only", action="store_true", help="do not steer generated tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=finite_float, default=1.0)
    p.add_argument("--top-k", type=positive_int, help="sampling: keep the k most likely tokens (with --sample)")
    p.add_argument("--top-p", type=finite_float, help="sampling: nucleus probability (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> list[str]:
    """Everything that needs no model: options, prompts, paths; returns the prompts."""
    from ..recipes.steering import parse_positions

    if args.clamp is None and not args.alpha:
        raise UsageError("give --alpha (additive steering) or --clamp VALUE")
    if args.clamp is not None and args.alpha:
        raise UsageError("give --alpha or --clamp, not both")
    if args.alpha and len(args.alpha) not in (1, len(args.feature)):
        raise UsageError(f"give one --alpha, or one per --feature ({len(args.feature)}); got {len(args.alpha)}")
    if len(set(args.feature)) != len(args.feature):
        raise UsageError("a --feature is given twice")
    if not args.sample and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k and --top-p apply to sampling; add --sample")
    if args.temperature <= 0:
        raise UsageError("--temperature must be > 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    with as_usage_errors():
        parse_positions(args.positions)
    prompts = read_texts(args.prompts_file, "--prompts-file") if args.prompts_file else check_texts(args.prompt)
    output_file(args.output)
    check_sources(args, [args.layer])
    return prompts


def run(args: argparse.Namespace) -> int:
    from ..backends import Sampling
    from ..recipes.steering import additive, clamp, steer

    prompts = _check(args)
    backend = open_backend(args)
    with as_usage_errors():
        backend.check_layer(args.layer)
        check_context(backend, prompts, source="--prompt" if args.prompt else args.prompts_file,
                      reserve=args.max_new_tokens)
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
    blocks = [f"### prompt {i}: {p!r}\n--- baseline\n{b.text}\n--- steered\n{s.text}\n"
              for i, (p, b, s) in enumerate(zip(prompts, baseline, steered))]
    emit(args, result, "\n".join(blocks))
    return 0
