"""How many features the exact screen keeps per row: bf16 screen (shipped) vs an fp8 e4m3 screen.

The screened encoder (docs/topk.md) is exact because it recomputes in full precision every
feature whose screened value lies within a rigorous error bound of the k-th; it only pays when
that candidate set is a small fraction of d_sae. This measures the set on Gaussian rows against
unit-norm encoder rows (the case docs/topk.md analyses) at the Qwen-Scope shapes:

* ``bf16``: the shipped screen (``qscope_plugins.sae.kernels.screen``: its bound, its floor).
* ``fp8``: the same design with e4m3 operands, scaled per row of ``x`` and per feature so each
  row's largest entry maps to 448 (what ``torch._scaled_mm`` row-wise scaling does), emulated
  exactly on CPU (products of fp8 numbers are exact in fp64). Its bound is the shipped one's
  Cauchy-Schwarz term with the fp8 rounding errors, *without* the accumulation and output
  terms and without the ``2 eps`` margin, so the fp8 figure is a lower bound on what an exact
  fp8 screen would have to recompute.

Usage: python benchmarks/screen_candidates.py [--shapes 2048x32768 ...] [--ks 50 100] [--rows 64]
"""

from __future__ import annotations

import argparse
import platform

import torch

from qscope_plugins.sae.kernels import screen

SHAPES = ("2048x32768", "4096x65536", "5120x81920", "2048x131072")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_round(t: torch.Tensor) -> torch.Tensor:
    """``t`` through e4m3 with a per-row scale mapping the row's largest |entry| to 448, in fp64."""
    scale = (t.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(t.dtype).tiny)
    return (t / scale).to(torch.float8_e4m3fn).double() * scale.double()


def measure(d_model: int, d_sae: int, k: int, rows: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, d_model, generator=gen)
    W /= W.norm(dim=1, keepdim=True)
    b = torch.randn(d_sae, generator=gen) * 0.01
    x = torch.randn(rows, d_model, generator=gen)
    sigma = (x.double() @ W.double().T).std(1)

    sw = screen.prepare(W, b)
    pairs, _, ok = screen.screen_chunk(x, k, sw, cap=d_sae)
    xa, dx = screen._augment(x, sw.n_terms)
    A_bf16, _ = screen.row_bounds(x, dx, xa, sw)

    Wq, xq = fp8_round(W), fp8_round(x)
    s = xq @ Wq.T + b.double()
    A_fp8 = (x.double().norm(dim=1) * (W.double() - Wq).norm(dim=1).max()
             + (x.double() - xq).norm(dim=1) * Wq.norm(dim=1).max())
    floor = s.topk(k, dim=1).values[:, -1] - 2 * A_fp8
    fp8_count = (s >= floor[:, None]).sum(1).double()
    return {
        "bf16_A_sigma": float((A_bf16 / sigma).mean()), "bf16_candidates": pairs.numel() / rows,
        "bf16_settled": float(ok.double().mean()),
        "fp8_A_sigma": float((A_fp8 / sigma).mean()), "fp8_candidates": float(fp8_count.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--ks", nargs="+", type=int, default=[50, 100])
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    print(f"device=cpu ({platform.machine()}); torch {torch.__version__}; {args.rows} Gaussian rows per shape, "
          "unit-norm encoder rows")
    print(f"{'shape':>12} {'k':>4} | {'bf16 A/sigma':>12} {'candidates':>10} {'% d_sae':>8} {'settled':>7} | "
          f"{'fp8 A/sigma':>11} {'candidates':>10} {'% d_sae':>8}")
    for shape in args.shapes:
        d_model, d_sae = (int(v) for v in shape.split("x"))
        for k in args.ks:
            m = measure(d_model, d_sae, k, args.rows)
            print(f"{shape:>12} {k:>4} | {m['bf16_A_sigma']:>12.3f} {m['bf16_candidates']:>10.0f} "
                  f"{100 * m['bf16_candidates'] / d_sae:>7.2f}% {100 * m['bf16_settled']:>6.0f}% | "
                  f"{m['fp8_A_sigma']:>11.2f} {m['fp8_candidates']:>10.0f} {100 * m['fp8_candidates'] / d_sae:>7.1f}%")


if __name__ == "__main__":
    main()
