"""``qscope convert SRC DST``: released layer files -> safetensors + JSON sidecar.

Every requested layer is checked (range, file present, k known, DST writable) before the first one
is written, so a wrong ``--layers`` leaves nothing behind. A local directory's layers are
discovered from its ``layer{n}.sae.pt`` files.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..catalog import LAYER_FILE, find_group, parse_repo_name
from ._inputs import require_hub
from ._options import UsageError, add_json, as_usage_errors, add_layers, emit, looks_like_path, output_dir, positive_int

_LAYER_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")


def local_layers(directory: Path) -> list[int]:
    """The layers whose released files ``layer{n}.sae.pt`` are in ``directory``."""
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _LAYER_FILE.match(p.name)) and p.is_file())


def plan(args: argparse.Namespace) -> list[int]:
    """The layers to convert, every one checked to exist; raises :class:`UsageError` otherwise."""
    src = args.src
    group = find_group(src)
    local = Path(src).expanduser()
    if group is not None:
        layers = list(range(group.n_layers)) if args.layers in (None, "all") else args.layers
        bad = [n for n in layers if n >= group.n_layers]
        if bad:
            raise UsageError(f"layer {bad[0]} out of range for {group.repo_id} (layers 0-{group.n_layers - 1})")
        require_hub(group.repo_id, group.filename(layers[0]), "SRC")
    elif local.is_dir():
        found = local_layers(local)
        if not found:
            raise UsageError(f"SRC {src}: no {LAYER_FILE.format(layer='{n}')} files in this directory")
        layers = found if args.layers in (None, "all") else args.layers
        missing = sorted(set(layers) - set(found))
        if missing:
            raise UsageError(f"SRC {src}: no {LAYER_FILE.format(layer=missing[0])} (layers present: "
                             f"{_ranges(found)})")
    elif local.exists():
        raise UsageError(f"SRC {src}: is a file; give a directory of layer files or a hub repo id")
    elif looks_like_path(src) or not parse_repo_name(src):
        raise UsageError(f"SRC {src}: no such directory, and not a known Qwen-Scope repo id or SAELens release "
                         "(see `qscope catalog`)")
    else:
        if args.layers in (None, "all"):
            raise UsageError("--layers is required when SRC is a hub repo not in the catalog (e.g. --layers 0-27)")
        layers = args.layers
        require_hub(src, LAYER_FILE.format(layer=layers[0]), "SRC")
    hint = group is not None or parse_repo_name(src) or parse_repo_name(str(local.resolve()))
    if args.k is None and not hint:
        raise UsageError(f"SRC {src}: its name does not carry the Top-k size (L0_{{k}}); pass --k")
    dst = output_dir(args.dst, "DST")
    if dst.exists() and dst.resolve() == local.resolve():
        raise UsageError("DST must differ from SRC")
    return layers


def check_files(args: argparse.Namespace, layers: list[int]) -> None:
    """Open every layer file (memory-mapped: keys, dtypes and shapes, no data read) before writing any layer.

    Values (NaN/Inf) are checked while each layer converts; a layer that fails then leaves the layers before it
    complete and verified, so the same command resumes after the file is fixed.
    """
    from ..sae.format import check_shapes, read_layer_file
    from ..sae.loading import resolve

    for layer in layers:
        with as_usage_errors():  # a layer file missing from the hub cache while offline: the command to run
            resolved = resolve(args.src, layer, args.revision)
        if resolved.converted:
            raise UsageError(f"SRC {args.src}: holds converted layers already (layer{layer}/); give the released files")
        group, hint = resolved.group, resolved.name_hint
        check_shapes(read_layer_file(resolved.path), str(resolved.path), d_model=group.d_model if group else None,
                     d_sae=group.d_sae if group else (hint[0] if hint else None))


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..sae.convert import convert
    from ..sae.loading import parse_dtype

    layers = plan(args)
    check_files(args, layers)
    written = convert(args.src, args.dst, layers, dtype=parse_dtype(args.dtype), revision=args.revision, k=args.k,
                      progress=lambda it: tqdm(it, desc="converting", unit="layer", disable=args.no_progress))
    skipped = sorted(set(layers) - set(written))
    text = f"converted {len(written)} layer(s) into {args.dst}" + (f"; already done: {_ranges(skipped)}" if skipped else "")
    emit(args, {"source": args.src, "destination": str(args.dst), "converted": written, "already_done": skipped}, text)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert Qwen-Scope layer files to safetensors + sidecar",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF repo id, SAELens release name or directory of layer{n}.sae.pt files")
    parser.add_argument("dst", type=Path, help="output directory (one layer{n}/ folder per layer)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "bf16", "fp16", "fp32"])
    add_layers(parser, help="layers to convert (default: all: every layer of a known repo, or every file of a directory)")
    parser.add_argument("--k", type=positive_int, help="Top-k size, needed only when SRC's name does not carry L0_{k}")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_json(parser, "print what was converted as JSON on stdout")
    parser.set_defaults(func=run)
