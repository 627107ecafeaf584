"""``qscope selfcheck``: load a generated SAE in the exact released format and show its features.

Runs offline in seconds: it writes a ``layer{n}.sae.pt`` with planted features, loads it
through the same path as a hub download, checks that the planted sparse codes come back, and
prints what each framework integration registered.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from ._options import UsageError, add_json, non_negative_int, positive_int


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import load_sae, register
    from ..testing.sae_files import random_sae_state, write_released_layer

    d_model, d_sae, k = args.d_model, args.d_sae, args.k
    if k > d_sae:
        raise UsageError(f"--k {k} must be at most --d-sae {d_sae}")
    with tempfile.TemporaryDirectory() as tmp:
        write_released_layer(tmp, 0, random_sae_state(d_model, d_sae, seed=args.seed))
        sae = load_sae(tmp, 0, k=k)
    gen = torch.Generator().manual_seed(args.seed + 1)
    planted = torch.randperm(d_sae, generator=gen)[:k].sort().values
    strengths = 2.0 + torch.rand(k, generator=gen)
    with torch.no_grad():
        x = strengths @ sae.directions(planted.tolist()) + sae.b_dec
        codes = sae.encode_sparse(x)
        recon = sae.decode_sparse(*codes)
    found = codes.indices.sort().values
    result = {
        "d_model": d_model, "d_sae": d_sae, "k": k,
        "planted_features": planted.tolist(),
        "recovered_features": found.tolist(),
        "all_recovered": bool(torch.equal(found, planted)),
        "relative_reconstruction_error": float((recon - x).norm() / x.norm()),
        "registered": register() or "already registered",
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"SAE d_model={d_model} d_sae={d_sae} k={k} loaded from a released-format layer file")
        print(f"planted features  : {result['planted_features']}")
        print(f"recovered features: {result['recovered_features']}")
        print(f"top activations   : {[round(v, 3) for v in codes.values.tolist()]}")
        print(f"relative reconstruction error: {result['relative_reconstruction_error']:.2e}")
        print("OK" if result["all_recovered"] else "MISMATCH")
    return 0 if result["all_recovered"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("selfcheck", help="load a generated released-format SAE and recover planted features")
    parser.add_argument("--d-model", type=positive_int, default=256)
    parser.add_argument("--d-sae", type=positive_int, default=4096)
    parser.add_argument("--k", type=positive_int, default=8)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_json(parser, "print the result as JSON on stdout")
    parser.set_defaults(func=run)
