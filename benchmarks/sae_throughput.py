"""SAE encode+decode throughput and peak memory: SAELens TopKSAE vs QwenScopeSAE, same weights, one run.

    python benchmarks/sae_throughput.py                 # CPU: 1024 tokens, all Qwen-Scope shapes, fp32
    python benchmarks/sae_throughput.py --tokens 8192   # CUDA (the default there)
    python benchmarks/sae_throughput.py --shapes 2048x32768 --ks 100 --dtypes float32 bfloat16

For each shape and dtype it times the bare encoder GEMM (the floor of an unscreened encoder) and,
for each k, SAELens ``encode`` + ``decode`` (dense codes, dense decode), this project's
``encode_sparse`` alone with the auto path (for fp32: bf16-screened where faster) and with
``screen="off"``, and ``encode_sparse`` + ``decode_sparse``. Timings are interleaved over the
repeats (so load on a shared machine hits every variant alike) and reported as medians, with
the spread (max/min) of the ratios. Targets (issue 20): fp32 ``encode_sparse`` <= 0.5x the fp32
GEMM where the CPU has bf16 support, encode+decode >= 2.5x SAELens. Peak extra memory of one call
is measured after the timings (the screened path's bf16 weight copy is made in the warm-up).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = ("2048x32768", "4096x65536", "5120x81920", "2048x131072")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory above the starting point while ``fn`` runs (CUDA allocator or process RSS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss("VmRSS:")
    fn()
    return _rss("VmHWM:") - base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(calls: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each entry, one warm-up each, then ``repeats`` rounds over all entries."""
    for fn in calls.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def build_pair(d_model: int, d_sae: int, k: int, dtype: torch.dtype, device: torch.device):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from qscope_plugins import QwenScopeSAE

    gen = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_model, d_sae, generator=gen) / d_model**0.5
    state = {"W_enc": W_dec.T.contiguous(), "W_dec": W_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)}
    state = {key: value.to(device=device, dtype=dtype) for key, value in state.items()}
    ours = QwenScopeSAE.from_weights(**state, k=k)
    theirs = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k, apply_b_dec_to_input=False,
                                   dtype=str(dtype).removeprefix("torch."), device=str(device)))
    theirs.load_state_dict({"W_enc": state["W_enc"].T, "W_dec": ours.W_dec.data, "b_enc": state["b_enc"],
                            "b_dec": state["b_dec"]}, assign=True)
    return ours, theirs


def _ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``num[i] / den[i]``."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def bench_shape(shape: str, ks: list[int], dtype: torch.dtype, tokens: int, device: torch.device,
                repeats: int, memory: bool = True) -> list[dict]:
    from qscope_plugins.sae.kernels import encode_screened

    d_model, d_sae = map(int, shape.split("x"))
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    rows = []
    for k in ks:
        # Weights built outside inference mode, as a loaded SAE is (inference tensors are never cached).
        ours, theirs = build_pair(d_model, d_sae, k, dtype, device)
        off = ours.__class__.from_parts(ours.cfg, ours.W_enc.T, ours.W_dec, ours.b_enc, ours.b_dec)
        off.screen = "off"

        def gemm(theirs=theirs):
            return x @ theirs.W_enc

        def saelens(theirs=theirs):
            return theirs.decode(theirs.encode(x))

        def encode(ours=ours):
            return ours.encode_sparse(x)

        def encode_off(off=off):
            return off.encode_sparse(x)

        def both(ours=ours):
            return ours.decode_sparse(*ours.encode_sparse(x))

        calls = {"gemm": gemm, "saelens": saelens, "encode": encode, "encode_off": encode_off, "qscope": both}
        with torch.inference_mode():
            times = interleaved_times(calls, device, repeats)
        row = {"shape": shape, "k": k, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
               "screened": encode_screened(device, d_model, d_sae, tokens, dtype)}
        for name, secs in times.items():
            row[f"{name}_ms"] = statistics.median(secs) * 1e3
        row["saelens_tok_s"] = tokens / statistics.median(times["saelens"])
        row["qscope_tok_s"] = tokens / statistics.median(times["qscope"])
        row["encode_vs_gemm"], row["encode_vs_gemm_min"], row["encode_vs_gemm_max"] = _ratio_stats(times["encode"], times["gemm"])
        row["encode_off_vs_gemm"] = _ratio_stats(times["encode_off"], times["gemm"])[0]
        row["speedup"], row["speedup_min"], row["speedup_max"] = _ratio_stats(times["saelens"], times["qscope"])
        if memory:
            with torch.inference_mode():
                row["saelens_peak_mib"] = peak_extra_bytes(saelens, device) / 2**20
                row["qscope_peak_mib"] = peak_extra_bytes(both, device) / 2**20
            row["memory_ratio"] = row["qscope_peak_mib"] / max(row["saelens_peak_mib"], 1e-9)
        rows.append(row)
        calls.clear()  # the closures hold the SAEs: drop them before the next k
        del ours, theirs, off, gemm, saelens, encode, encode_off, both
        gc.collect()
    return rows


def main() -> None:
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed large blocks resident once its dynamic mmap threshold grows, which would
        # hide a call's peak from the RSS counter; a fixed threshold makes every large buffer visible.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--ks", nargs="+", type=int, default=[50, 100])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--tokens", type=int, default=None, help="default: 8192 on CUDA, 1024 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokens = args.tokens or (8192 if device.type == "cuda" else 1024)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    import sae_lens

    from qscope_plugins.sae.kernels.screen import cpu_has_bf16_dot

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                f"bf16 dot {'yes' if cpu_has_bf16_dot() else 'no'}")
    print(f"device: {device} ({name}); torch {torch.__version__}; sae-lens {sae_lens.__version__}; "
          f"tokens {tokens}; median of {repeats} interleaved rounds")
    print(f"{'shape':>12} {'k':>4} {'dtype':>9} {'GEMM ms':>8} {'enc ms':>8} {'enc/GEMM':>17} {'off/GEMM':>8} "
          f"{'SAELens ms':>10} {'ours ms':>8} {'speedup':>17} {'mem ratio':>9}")
    rows = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            for row in bench_shape(shape, args.ks, getattr(torch, dtype_name), tokens, device, repeats,
                                   memory=not args.no_memory):
                rows.append(row)
                print(f"{shape:>12} {row['k']:>4} {row['dtype']:>9} {row['gemm_ms']:>8.0f} {row['encode_ms']:>8.0f} "
                      f"{row['encode_vs_gemm']:>5.2f} ({row['encode_vs_gemm_min']:.2f}-{row['encode_vs_gemm_max']:.2f}) "
                      f"{row['encode_off_vs_gemm']:>8.2f} {row['saelens_ms']:>10.0f} {row['qscope_ms']:>8.0f} "
                      f"{row['speedup']:>5.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) "
                      f"{row.get('memory_ratio', float('nan')):>9.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
