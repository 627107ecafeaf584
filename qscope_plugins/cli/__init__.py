"""``qscope``: a thin command line over the public API.

Each subcommand lives in its own module of this package and exposes ``add_parser(subparsers)``;
the parser it adds sets ``func=callable(args) -> int``. :data:`COMMANDS` names them (one line per
command) so that only the module of the command being run is imported: ``qscope --help``,
``--version``, ``catalog`` and ``doctor`` import no framework. The shared option vocabulary and
the error classes are in :mod:`._options`.

Exit status: 0 success, 1 the command failed while working, 2 a wrong command line (found before
any work), 130 interrupted. Errors are one line ``qscope <cmd>: error: ...``; ``--verbose`` adds
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ._options import Parser, UsageError

# name -> (module in this package, one-line help). Keep alphabetical.
COMMANDS: dict[str, tuple[str, str]] = {
    "app": ("app", "the feature explorer (Gradio; pip install 'qscope-plugins[app]')"),
    "catalog": ("catalog", "list the Qwen-Scope SAE groups"),
    "classify": ("classify", "SAE-feature classifiers: fit, evaluate, apply"),
    "contrast": ("contrast", "rank SAE features by positive-vs-negative difference"),
    "convert": ("convert", "convert Qwen-Scope layer files to safetensors + sidecar"),
    "coverage": ("coverage", "coverage of safety-relevant SAE features by a dataset"),
    "dashboard": ("dashboard", "static HTML feature pages from an activation index"),
    "demo": ("demo", "run every recipe on the bundled nano Qwen3 and its SAEs (offline, CPU, minutes)"),
    "doctor": ("doctor", "versions, tested window, registrations, CUDA/Triton, cached repos: for bug reports"),
    "eval-sae": ("eval_sae", "SAE quality per layer: EV/FVU, L0, dead features, CE loss recovered"),
    "explain": ("explain", "explain features from an activation index with an LLM, detection-scored"),
    "features": ("features", "top SAE features of a text at given layers"),
    "footprint": ("footprint", "SAE feature footprints of benchmarks (sparse, resumable store)"),
    "index": ("index", "sparse, resumable activation index of SAE features over a corpus"),
    "redundancy": ("redundancy", "benchmark redundancy (R_hat, R) and overlap from footprints"),
    "selfcheck": ("selfcheck", "load a generated released-format SAE and recover planted features"),
    "steer": ("steer", "generate with and without steering by SAE features"),
    "subset": ("subset", "max-coverage subset of a benchmark from its footprints"),
    "synth": ("synth", "feature-driven safety data synthesis"),
}


def _version() -> str:
    from .. import __version__

    return f"qscope {__version__} (qscope-plugins)"


def _selected(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` (every one when ``argv`` is None) is built in full."""
    parser = Parser(
        prog="qscope", description="Qwen-Scope SAEs for TransformerLens, SAELens and nnsight.",
        epilog="Run `qscope doctor` and include its output when you report a bug.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--verbose", action="store_true", help="show the traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _selected(argv) if argv is not None else None
    for name, (module, help_text) in COMMANDS.items():
        if argv is None or name == chosen:
            importlib.import_module(f"{__name__}.{module}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if not isinstance(err, (ValueError, KeyError, OSError, RuntimeError, ImportError, MemoryError)):
        text = (f"{type(err).__name__}: {text} (an internal error: rerun with --verbose and report it "
                "with the output of `qscope doctor`)")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    verbose = "--verbose" in head
    if verbose and _selected(head) is not None:  # --verbose after the subcommand works too
        argv.remove("--verbose")
        argv.insert(0, "--verbose")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    name = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        status, error = 2, err
    except KeyboardInterrupt:
        print(f"qscope {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, never a traceback (unless --verbose)
        status, error = 1, err
    if verbose:
        traceback.print_exception(error)
    print(f"qscope {name}: error: {_describe(error)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
