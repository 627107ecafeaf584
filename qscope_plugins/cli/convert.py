"""``qscope convert SRC DST``: released layer files -> safetensors + JSON sidecar."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..catalog import find_group


def run(args: argparse.Namespace) -> int:
    from ..sae.convert import convert, parse_layers
    from ..sae.loading import parse_dtype

    group = find_group(args.src)
    if args.layers:
        layers = parse_layers(args.layers)
    elif group is not None:
        layers = list(range(group.n_layers))
    else:
        raise ValueError("--layers is required when SRC is not a known Qwen-Scope repo (e.g. --layers 0-27)")
    written = convert(args.src, args.dst, layers, dtype=parse_dtype(args.dtype), revision=args.revision, k=args.k,
                      progress=lambda it: tqdm(it, desc="converting", unit="layer"))
    skipped = sorted(set(layers) - set(written))
    print(f"converted {len(written)} layer(s) into {args.dst}" + (f"; already done: {skipped}" if skipped else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert Qwen-Scope layer files to safetensors + sidecar")
    parser.add_argument("src", help="HF repo id, SAELens release name or directory of layer{n}.sae.pt files")
    parser.add_argument("dst", help="output directory (one layer{n}/ folder per layer)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "bf16", "fp16", "fp32"])
    parser.add_argument("--layers", help="e.g. 0-5 or 0,3,7 (default: every layer of a known repo)")
    parser.add_argument("--k", type=int, help="Top-k size, needed only when SRC's name does not carry L0_{k}")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.set_defaults(func=run)
