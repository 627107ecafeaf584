"""``qscope synth SEED --features FEATURES.json --synthetic OUT.jsonl``: synthesise examples for the targets SEED misses.

Measures the seed set's coverage, takes its missing (then weakly covered) targets, builds one request
per target from its explanation and/or top-activating contexts mined from ``--corpus``, and appends
verified examples to OUT.jsonl until the budget is spent. ``--dry-run`` shows the plan and writes
nothing; ``--resume`` continues an interrupted run; ``--baseline`` adds the random-synthesis baseline
at the same budget. Prints the coverage before and after (``--json``: one JSON summary, which
``--output`` writes to a file).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .coverage import (
    add_coverage_arguments, check_lengths, measure, open_model, read_examples, read_inputs, relevance, text_generator,
)
from ._options import UsageError, emit, non_negative_int, output_file, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synth", help="feature-driven safety data synthesis",
                              description=__doc__.split("\n\n")[0])
    add_coverage_arguments(p)
    p.add_argument("--synthetic", type=Path, help="JSONL file the examples are appended to (required unless --dry-run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings")
    p.add_argument("--dry-run", action="store_true", help="show the targets and requests, generate and write nothing")
    p.add_argument("--budget", type=positive_int, default=100, help="examples in the output at most")
    p.add_argument("--per-feature", type=positive_int, default=1, help="verified examples wanted per target")
    p.add_argument("--max-rounds", type=positive_int, default=3, help="generation rounds per target at most")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--missing-only", action="store_true", help="skip weakly covered targets")
    p.add_argument("--corpus", help="texts to mine top-activating contexts from (one per line or .jsonl)")
    p.add_argument("--contexts", type=positive_int, default=5, help="contexts per feature")
    p.add_argument("--generator", choices=("llm", "contexts"), default="llm",
                   help="llm: a text-generation model writes prompts, rewrites and responses; "
                        "contexts: prompts are the mined contexts themselves (offline, no model)")
    p.add_argument("--generator-model", help="text-generation model for --generator llm and --explain")
    p.add_argument("--styles", default=",".join(_styles()), help="adversarial rewrite styles, comma-separated ('' for none)")
    p.add_argument("--no-responses", action="store_true", help="prompts only (no refusing/helpful response)")
    p.add_argument("--explain", action="store_true", help="generate missing explanations from the contexts")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="per generator call")
    p.add_argument("--baseline", type=Path, help="also write the random-synthesis baseline (same budget) here")
    p.set_defaults(func=run)


def _styles() -> list[str]:
    from ..recipes.synthesis import REWRITE_STYLES

    return list(REWRITE_STYLES)


def _check(args: argparse.Namespace) -> None:
    if not args.dry_run and args.synthetic is None:
        raise UsageError("give --synthetic OUT.jsonl (or --dry-run)")
    if args.generator == "contexts" and not args.corpus:
        raise UsageError("--generator contexts needs --corpus to mine contexts from")
    if not args.dry_run and (args.generator == "llm" or args.explain) and not args.generator_model:
        raise UsageError("--generator llm and --explain need --generator-model")
    unknown = set(filter(None, args.styles.split(","))) - set(_styles())
    if unknown:
        raise UsageError(f"unknown style {sorted(unknown)[0]!r}; choose from {', '.join(_styles())}")
    if not args.dry_run:
        output_file(args.synthetic, "--synthetic")
        output_file(args.baseline, "--baseline")
        if args.synthetic is not None and args.baseline is not None and \
                args.synthetic.expanduser().resolve() == args.baseline.expanduser().resolve():
            raise UsageError("--synthetic and --baseline must be different files")
        for flag, path in (("--synthetic", args.synthetic), ("--baseline", args.baseline)):
            state = path.with_name(path.name + ".state.json") if path is not None else None
            if path is not None and not args.resume and (path.exists() or state.exists()):
                raise UsageError(f"{flag} {path} exists; resume it (qscope synth --resume) or choose another output")


def _generators(args: argparse.Namespace, complete):
    from ..recipes.synthesis import REWRITE_STYLES, ContextPrompter, Generators, LLMPrompter, LLMResponder, llm_rewriters

    if args.generator == "contexts":
        return Generators(ContextPrompter())
    styles = {s: REWRITE_STYLES[s] for s in filter(None, args.styles.split(","))}
    return Generators(LLMPrompter(complete), llm_rewriters(complete, styles),
                      None if args.no_responses else LLMResponder(complete))


def run(args: argparse.Namespace) -> int:
    from ..recipes.coverage import coverage_report, example_text
    from ..recipes.synthesis import explain, plan_requests, priority_targets, top_contexts

    _check(args)
    targets, examples = read_inputs(args)
    corpus = [example_text(e) for e in read_examples(args.corpus, "--corpus")] if args.corpus else []
    scores = relevance(args, targets)
    backend, saes, render = open_model(args, targets)

    seed = check_lengths(backend, [example_text(e, render) for e in examples], args.data)
    seed_support = measure(args, backend, saes, seed, targets)

    def coverage(added=()):
        """The report for the seed set plus ``added`` texts."""
        support = seed_support + measure(args, backend, saes, added, targets) if added else seed_support
        return coverage_report(support, scores, tau=args.tau, min_support=args.min_support)

    before = coverage()
    wanted = priority_targets(before, targets, include_weak=not args.missing_only)
    summary = {"before": before.to_dict(), "targets": [list(t.key) for t in wanted]}
    if not wanted:
        return emit_summary(args, summary, f"nothing to synthesise: {before.summary()}")
    contexts = {}
    if corpus:
        contexts = top_contexts(backend, saes, corpus, [t.key for t in wanted], n=args.contexts,
                                batch_size=args.batch_size, progress=not args.no_progress)
    complete = None
    if not args.dry_run and (args.generator == "llm" or args.explain):
        complete = text_generator(args, args.generator_model, max_new_tokens=args.max_new_tokens)
    if args.explain and complete is not None:
        wanted = [replace(t, explanation=explain(complete, contexts[t.key])) if not t.explanation and contexts.get(t.key)
                  else t for t in wanted]
    requests = plan_requests(wanted, contexts, need_label=args.generator == "llm" and not args.no_responses)
    if args.dry_run:
        summary["budget"] = args.budget
        summary["requests"] = [{"layer": r.layer, "feature": r.feature, "label": r.label, "description": r.description,
                                "contexts": list(r.contexts)} for r in requests]
        lines = [before.summary(), f"would synthesise up to {args.budget} examples for {len(requests)} targets "
                                   f"with the {args.generator} generator:"]
        lines += [f"  ({r.layer}, {r.feature}) {r.label or '-'}: {r.description} [{len(r.contexts)} contexts]"
                  for r in requests]
        return emit_summary(args, summary, "\n".join(lines))
    try:
        lines = _synthesise(args, backend, saes, render, wanted, contexts, _generators(args, complete), seed, corpus,
                            coverage, summary)
    except FileExistsError as err:
        raise UsageError(str(err)) from None
    return emit_summary(args, summary, "\n".join([f"before: {before.summary()}", *lines]))


def _synthesise(args, backend, saes, render, wanted, contexts, generators, seed, corpus, coverage, summary) -> list[str]:
    """Run the synthesis (and the baseline), fill ``summary``, return the report lines."""
    from ..recipes.coverage import example_text
    from ..recipes.synthesis import random_synthesis, read_synthetic, synthesize

    options = dict(render=render, seed=args.seed, exclude=seed, resume=args.resume, progress=not args.no_progress)
    result = synthesize(backend, saes, wanted, args.synthetic, generators, budget=args.budget,
                        per_feature=args.per_feature, max_rounds=args.max_rounds, contexts=contexts,
                        skip_first_token=args.skip_first_token, batch_size=args.batch_size, **options)
    after = coverage([example_text(r, render) for r in read_synthetic(args.synthetic)])
    summary |= {"after": after.to_dict(), "synthetic": str(args.synthetic), "added": result.added,
                "total": result.total, "generated": result.generated, "unfilled": [list(k) for k in result.unfilled]}
    lines = [f"after:  {after.summary()}",
             f"{args.synthetic}: {result.total} examples ({result.added} added, {result.generated} candidates generated)"]
    if args.baseline is not None and result.total:
        # the context prompter draws random corpus texts (never the targets' contexts); an LLM gets none
        pool = corpus if args.generator == "contexts" else []
        base = random_synthesis(args.baseline, generators, budget=result.total, contexts=pool, **options)
        random_after = coverage([example_text(r, render) for r in read_synthetic(args.baseline)])
        summary |= {"baseline": random_after.to_dict(), "baseline_file": str(args.baseline)}
        lines.append(f"random: {random_after.summary()} ({base.total} examples in {args.baseline})")
    return lines


def emit_summary(args: argparse.Namespace, summary: dict, text: str) -> int:
    """Print (or ``--output``) the JSON summary with ``--json``, else the text lines; the exit status."""
    emit(args, summary, text)
    return 0
