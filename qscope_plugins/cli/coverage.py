"""``qscope coverage DATA --features FEATURES.json``: which target SAE features a dataset fires, and which it misses.

Also home of the inputs ``qscope synth`` shares: the features file, the relevance judge, the
examples file and the chat-template switch. Everything is read and validated before the model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._inputs import check_sources, open_backend, open_saes, read_texts
from ._options import (
    UsageError, add_first_token, add_model_options, as_usage_errors, check_context, emit, finite_float, input_file, output_file,
    positive_int,
)
from .features import format_table


def add_coverage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="seed examples: .jsonl of strings or {'text'} / {'prompt','response'} objects, "
                                "or one text per line")
    p.add_argument("--features", required=True, type=Path,
                   help="JSON list of {'layer', 'feature', 'explanation'?, 'score'?, 'label'?}")
    judge = p.add_mutually_exclusive_group()
    judge.add_argument("--scores", type=Path, help="relevance scores: {'layer:feature': score} or a features list "
                                                   "(default: the features file's own 'score' fields)")
    judge.add_argument("--judge-model", help="score explanations with this text-generation model instead")
    p.add_argument("--chat", action="store_true", help="send LLM requests as chat messages (chat template)")
    p.add_argument("--chat-render", action="store_true",
                   help="measure prompt/response examples in the model's chat template (default: prompt, blank line, response)")
    p.add_argument("--tau", type=finite_float, default=0.5, help="relevance threshold: targets have score >= tau")
    p.add_argument("--min-support", type=positive_int, default=3, help="targets firing on fewer examples are 'weak'")
    add_first_token(p)
    add_model_options(p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("coverage", help="coverage of safety-relevant SAE features by a dataset",
                              description=__doc__.split("\n\n")[0])
    add_coverage_arguments(p)
    p.set_defaults(func=run)


def read_examples(path: str | Path, flag: str = "DATA") -> list:
    """Examples from ``.jsonl`` (strings, ``{"text"}`` or ``{"prompt", "response"?}``) or one text per line."""
    from ..recipes.coverage import example_text

    path = input_file(path, flag)
    if path.suffix != ".jsonl":
        return read_texts(path, flag)
    from .._io import jsonl_values

    examples = []
    for i, item in jsonl_values(path, error=UsageError):
        if not isinstance(item, (str, dict)):
            raise UsageError(f"{path}:{i}: expected a JSON string or object, got {type(item).__name__}")
        try:
            example_text(item)
        except (ValueError, TypeError) as err:
            raise UsageError(f"{path}:{i}: {err}") from None
        examples.append(item)
    if not examples:
        raise UsageError(f"{path} holds no examples")
    return examples


def text_generator(args: argparse.Namespace, model: str, **generate_kwargs):
    """A ``Complete`` callable over a transformers text-generation pipeline for ``model``."""
    from transformers import pipeline

    from ..recipes.coverage import pipeline_complete

    return pipeline_complete(pipeline("text-generation", model=model, device=args.device), chat=args.chat,
                             **generate_kwargs)


def relevance(args: argparse.Namespace, targets) -> dict:
    """``{(layer, feature): score}`` from ``--scores``, ``--judge-model`` or the features file."""
    from ..recipes.coverage import LLMJudge, ScoreTable, judge_features

    if args.judge_model:
        judge = LLMJudge(text_generator(args, args.judge_model, max_new_tokens=16, do_sample=False))
    elif args.scores:
        judge = ScoreTable.from_json(args.scores)
    else:
        unscored = [t.key for t in targets if t.score is None]
        if unscored:
            raise UsageError(f"feature {unscored[0]} has no score: add 'score' to {args.features}, "
                             "or pass --scores or --judge-model")
        judge = ScoreTable({t.key: t.score for t in targets}, str(args.features))
    return judge_features(targets, judge)


def read_inputs(args: argparse.Namespace):
    """``(targets, examples)``: the cheap inputs, validated before any model loads."""
    from ..recipes.coverage import read_features

    input_file(args.features, "--features")
    if args.scores is not None:
        input_file(args.scores, "--scores")
    try:
        targets = read_features(args.features)
    except (ValueError, UnicodeDecodeError) as err:
        message = str(err) if str(args.features) in str(err) else f"{args.features}: {err}"
        raise UsageError(f"--features {message}") from None
    examples = read_examples(args.data)
    output_file(args.output)
    check_sources(args, sorted({t.layer for t in targets}))
    return targets, examples


def open_model(args: argparse.Namespace, targets):
    """``(backend, saes, render)`` for the targets' layers."""
    from ..recipes.coverage import chat_render, default_render

    backend = open_backend(args)
    saes = open_saes(args, backend, sorted({t.layer for t in targets}))
    return backend, saes, chat_render(backend.tokenizer) if args.chat_render else default_render


def check_lengths(backend, texts: list[str], source: str) -> list[str]:
    """Refuse examples longer than the model's context (a usage error naming the file and example)."""
    with as_usage_errors():
        check_context(backend, texts, source=source)
    return texts


def measure(args: argparse.Namespace, backend, saes, texts, targets):
    """:class:`Support` of ``texts`` for the targets, with the command's batching and progress options."""
    from ..recipes.coverage import collect_support

    return collect_support(backend, saes, texts, [t.key for t in targets], skip_first_token=args.skip_first_token,
                           batch_size=args.batch_size, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from ..recipes.coverage import coverage_report, example_text

    targets, examples = read_inputs(args)
    scores = relevance(args, targets)
    backend, saes, render = open_model(args, targets)
    texts = check_lengths(backend, [example_text(e, render) for e in examples], args.data)
    support = measure(args, backend, saes, texts, targets)
    report = coverage_report(support, scores, tau=args.tau, min_support=args.min_support)
    emit(args, {"model": args.model, "sae": args.sae, "data": args.data, **report.to_dict()},
         f"{report.summary()}\n{format_table(report.rows)}")
    return 0
