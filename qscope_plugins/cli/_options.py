"""The one option vocabulary of ``qscope``, declared once, and the checks every subcommand shares.

Every subcommand builds its options from these helpers, so a flag means the same thing everywhere:

=====================  ==========================================================================
``--json``             print machine-readable JSON on stdout (never a path)
``--output PATH``      write the result as JSON to this file (atomically); stdout still gets the text form
``--output-dir DIR``   write several files into this directory (``demo``, ``redundancy``)
``--layers SPEC``      a set of decoder layers: ``3``, ``0-5``, ``0,2,7``, ``all`` (or several tokens)
``--layer N``          exactly one decoder layer
``--keep-first-token`` let each text's first token count (default everywhere: skipped, its norm is extreme)
``--top N``            how many features to report / use (per layer or per text)
``--model``/``--sae``  hub id or local path of the model / of the SAE
``--k``                Top-k size, only when neither the SAE's name nor its files say
``--device``           ``auto`` (default: CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``
=====================  ==========================================================================

Errors: :class:`UsageError` (a wrong command line, found by validation before any work) exits 2;
anything that fails while the command works exits 1. Both print one line
``qscope <cmd>: error: ...``; ``--verbose`` adds the traceback. Nothing here imports torch or a
framework at import time, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

BACKENDS = ("hf", "transformer-lens", "nnsight")  # == qscope_plugins.backends.KINDS (a test checks)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


class UsageError(ValueError):
    """The command line is wrong (a value, a combination, a path it names); exits 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``qscope <cmd>: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---- deprecated spellings -----------------------------------------------------------------------
def warn(prog: str, message: str) -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr)


class _Deprecated(argparse.Action):
    """An old spelling that still works: it warns once, then acts like ``new``."""

    def __init__(self, option_strings, dest, new: str, kind: str = "store", **kwargs):
        kwargs.setdefault("default", argparse.SUPPRESS)
        kwargs.setdefault("help", argparse.SUPPRESS)
        if kind == "const":
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.kind = new, kind

    def __call__(self, parser, namespace, values, option_string=None):
        warn(parser.prog, f"{option_string} is deprecated; use {self.new}")
        if self.kind == "const":
            values = self.const
        elif self.kind == "append":
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def deprecated(parser: argparse.ArgumentParser, old: str, new: str, dest: str, kind: str = "store", **kwargs) -> None:
    """Keep ``old`` as a hidden alias of ``new`` (same ``dest``) that warns when used."""
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, kind=kind, **kwargs)


# ---- value types (argparse ``type=``: a bad value is a usage error, exit 2) -----------------------
def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def device_name(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


# ---- layers --------------------------------------------------------------------------------------
ALL = "all"


def id_ranges(spec: str) -> Iterator[tuple[str, int, int]]:
    """The comma-separated parts of ``"3"``, ``"0-5"``, ``"0,2,7"``, ``"0,4-6"`` as ``(part, first, last)``, in order.

    The one grammar of id lists (layers, feature ids): a part is ``N`` or ``N-M`` with plain digits; a
    malformed part raises ``ValueError(part)`` when it is reached. ``"all"`` is the caller's to handle.
    """
    for part in str(spec).strip().split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(part)
        yield part, int(lo), int(hi if dash else lo)


def parse_layer_spec(spec: str) -> list[int] | str:
    """``"3"``, ``"0-5"``, ``"0,2,7"``, ``"0,4-6"`` -> sorted layer list; ``"all"`` stays ``"all"``.

    A layer given twice is an error (it would be computed twice and reported once).
    """
    spec = str(spec).strip()
    if spec.lower() == ALL:
        return ALL
    layers: list[int] = []
    try:
        for part, start, stop in id_ranges(spec):
            if stop < start:
                raise UsageError(f"bad layer range {part.strip()!r}: end before start")
            layers.extend(range(start, stop + 1))
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(f"bad layer spec {err.args[0].strip()!r}: use forms like 3, 0-5, 0,2,7 or all") from None
    seen: set[int] = set()
    for layer in layers:
        if layer in seen:
            raise UsageError(f"layer {layer} is given twice in --layers {spec!r}")
        seen.add(layer)
    return sorted(layers)


class _Layers(argparse.Action):
    """``--layers`` tokens (``3``, ``0-5``, ``0,2,7``, ``all``; old form: several tokens) -> list or ``"all"``."""

    def __init__(self, option_strings, dest, new: str | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        if self.new:
            warn(parser.prog, f"{option_string} is deprecated; use {self.new}")
        tokens = values if isinstance(values, list) else [values]
        try:
            parts = [parse_layer_spec(t) for t in tokens]
            if ALL in parts:
                if len(parts) > 1:
                    raise UsageError("'all' cannot be combined with other layers")
                setattr(namespace, self.dest, ALL)
                return
            merged = parse_layer_spec(",".join(str(x) for p in parts for x in p))
        except UsageError as err:
            parser.error(f"argument {option_string}: {err}")
        setattr(namespace, self.dest, merged)


def add_layers(parser, *, required: bool = False, help: str = "decoder layers", deprecated_alias: str | None = None,
               default=None) -> None:
    """``--layers SPEC`` (see :func:`parse_layer_spec`); ``deprecated_alias`` (e.g. ``--layer``) still parses."""
    # with an alias, "required" is that of a group of two (argparse counts each spelling apart)
    group = parser.add_mutually_exclusive_group(required=required) if deprecated_alias else parser
    group.add_argument("--layers", nargs="+", action=_Layers, required=required and not deprecated_alias,
                       default=default, metavar="SPEC", help=f"{help}: 3, 0-5, 0,2,7 or all")
    if deprecated_alias:
        group.add_argument(deprecated_alias, dest="layers", nargs="+", action=_Layers, new="--layers",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_layer(parser, *, required: bool = False, help: str = "decoder layer n (0-based)") -> None:
    """``--layer N``: exactly one decoder layer."""
    parser.add_argument("--layer", type=non_negative_int, required=required, metavar="N", help=help)


def resolve_layers(layers: list[int] | str | None, n_layers: int, *, flag: str = "--layers") -> list[int]:
    """``"all"``/``None`` -> every layer; otherwise each must be in ``0..n_layers-1``."""
    if layers is None or layers == ALL:
        return list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UsageError(f"layer {bad[0]} is out of range: this model has layers 0..{n_layers - 1}")
    return list(layers)


# ---- shared groups of options --------------------------------------------------------------------
def add_json(parser, help: str = "print the result as JSON on stdout") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_output(parser, help: str = "also write the result as JSON to this file (atomically)") -> None:
    parser.add_argument("--output", type=Path, metavar="PATH", help=help)


def add_output_dir(parser, help: str, default: Path | None = None) -> None:
    parser.add_argument("--output-dir", type=Path, metavar="DIR", default=default, help=help)


def add_first_token(parser) -> None:
    """``--keep-first-token`` / ``--skip-first-token`` into ``args.skip_first_token`` (default: skip)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--keep-first-token", dest="skip_first_token", action="store_false",
                       help="let each text's first token count (default: skipped; its norm is extreme)")
    group.add_argument("--skip-first-token", dest="skip_first_token", action="store_true",
                       help="leave each text's first token out (the default)")
    parser.set_defaults(skip_first_token=True)
    deprecated(parser, "--keep-first", "--keep-first-token", "skip_first_token", kind="const", const=False)


def add_top(parser, default: int, help: str) -> None:
    parser.add_argument("--top", type=positive_int, default=default, metavar="N", help=help)


def add_model_options(parser, *, json_help: str | None = "print the result as JSON on stdout",
                      output: bool = True) -> None:
    """``--model --sae --k --backend --device --dtype --batch-size --no-progress`` (+ ``--json --output``)."""
    parser.add_argument("--model", required=True, help="model hub id or local checkpoint directory")
    parser.add_argument("--sae", required=True, help="SAE repo id, SAELens release, directory or layer file")
    parser.add_argument("--k", type=positive_int, help="Top-k size, when neither the SAE's name (L0_{k}) nor its files say")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="framework that runs the model")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="float32",
                        help="model dtype (SAE math is float32 regardless)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if json_help is not None:
        add_json(parser, json_help)
    if output:
        add_output(parser)


# ---- checks --------------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda``/``cpu``; a device this torch cannot use is a usage error naming the fix."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"--device {name}: XPU is not available here; use --device cpu")
    return name


def looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or os.sep != "/" and os.sep in text


def input_file(path: str | os.PathLike, flag: str) -> Path:
    """An existing, readable regular file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: permission denied (not readable)")
    return path


def output_file(path: Path | None, flag: str = "--output") -> Path | None:
    """Check that ``path`` can be written (atomically) before any work is done."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a file path")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable")
    return path


def output_dir(path: Path | None, flag: str = "--output-dir") -> Path | None:
    """A directory that exists and is writable, or can be created (its nearest existing parent is writable)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {probe} is not writable")
    return path


def check_text(text, where: str) -> str:
    """A text must be a non-blank string without NUL bytes; ``where`` names it in the error."""
    if not isinstance(text, str):
        raise UsageError(f"{where} is {type(text).__name__}, expected a string")
    if not text:
        raise UsageError(f"{where} is empty (no tokens)")
    if "\x00" in text:
        raise UsageError(f"{where} contains a NUL byte")
    if not text.strip():
        raise UsageError(f"{where} is blank (only whitespace)")
    return text


def check_texts(texts: Sequence[str], label: str = "prompt") -> list[str]:
    if not texts:
        raise UsageError(f"no {label}s given")
    return [check_text(text, f"{label} {i}") for i, text in enumerate(texts)]


def check_context(backend, texts: Sequence[str], *, source: str, reserve: int = 0) -> None:
    """Refuse texts longer than the model's context (``reserve``: tokens still to be generated)."""
    limit = getattr(getattr(getattr(backend, "model", None), "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for i, ids in enumerate(backend.encode(list(texts))):
        if len(ids) + reserve > limit:
            extra = f" + {reserve} new tokens" if reserve else ""
            raise UsageError(f"{source}: text {i} has {len(ids)} tokens{extra}, over the model's context of {limit}")


@contextlib.contextmanager
def as_usage_errors() -> Iterator[None]:
    """Argument checks done by the library (``ValueError``/``KeyError``) become usage errors (exit 2).

    A malformed file (:class:`~qscope_plugins.sae.format.SAEFormatError`) stays a runtime error.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, KeyError, IndexError, FileNotFoundError, FileExistsError) as err:
        if type(err).__name__ == "SAEFormatError":
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise UsageError(message) from err


# ---- output --------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``path`` atomically (:func:`qscope_plugins._io.atomic_write`); no temp file survives a failure."""
    from .._io import atomic_write

    return atomic_write(Path(path).expanduser().resolve(), data)


def emit(args: argparse.Namespace, result, text: str | None = None) -> None:
    """The one way a command reports its result.

    ``--output PATH``: the JSON form of ``result`` is written to PATH (atomically). stdout: the JSON
    form with ``--json``, else ``text`` (the human form; ``None``: the JSON form too).
    """
    import json

    data = json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    if getattr(args, "output", None) is not None:
        write_atomic(args.output, data)
    shown = data if getattr(args, "json", False) or text is None else text
    sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")
