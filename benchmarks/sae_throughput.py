"""SAE encode+decode throughput and peak memory: SAELens TopKSAE vs QwenScopeSAE, same weights, one run.

    python benchmarks/sae_throughput.py                 # CPU: small N, all Qwen-Scope shapes
    python benchmarks/sae_throughput.py --tokens 8192   # on a CUDA machine, bf16 and fp32
    python benchmarks/sae_throughput.py --shapes 2048x32768 --ks 100 --dtypes float32 --tokens 1024

For each shape, k and dtype it times SAELens ``encode`` + ``decode`` (dense codes, dense decode)
and this project's ``encode_sparse`` + ``decode_sparse`` (Top-k codes, gather decode), plus the
bare encoder GEMM as a floor, and the peak extra memory of one call. Prints a table with the
device and versions, and the ratios (ours / SAELens).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
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


def seconds_per_call(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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


@torch.inference_mode()
def bench_one(shape: str, k: int, dtype: torch.dtype, tokens: int, device: torch.device, repeats: int) -> dict:
    d_model, d_sae = map(int, shape.split("x"))
    ours, theirs = build_pair(d_model, d_sae, k, dtype, device)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    calls = {
        "saelens": lambda: theirs.decode(theirs.encode(x)),
        "qscope": lambda: ours.decode_sparse(*ours.encode_sparse(x)),
        "gemm": lambda: x @ theirs.W_enc,
    }
    row = {"shape": shape, "k": k, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens}
    for name, fn in calls.items():
        secs = seconds_per_call(fn, device, repeats)
        row[f"{name}_tok_s"] = tokens / secs
        row[f"{name}_ms"] = secs * 1e3
        if name != "gemm":
            row[f"{name}_peak_mib"] = peak_extra_bytes(fn, device) / 2**20
    row["speedup"] = row["qscope_tok_s"] / row["saelens_tok_s"]
    row["memory_ratio"] = row["qscope_peak_mib"] / max(row["saelens_peak_mib"], 1e-9)
    calls.clear()  # the lambdas hold the SAEs and the input: drop them before collecting
    gc.collect()
    return row


def main() -> None:
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed large blocks resident once its dynamic mmap threshold grows, which would
        # hide a call's peak from the RSS counter; a fixed threshold makes every large buffer visible.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--ks", nargs="+", type=int, default=[50, 100])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=None, help="default: 8192 on CUDA, 256 on CPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokens = args.tokens or (8192 if device.type == "cuda" else 256)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    import sae_lens

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; sae-lens {sae_lens.__version__}; tokens {tokens}")
    header = f"{'shape':>12} {'k':>4} {'dtype':>9} {'SAELens tok/s':>14} {'ours tok/s':>11} {'speedup':>8} {'GEMM ms':>8} {'SAELens MiB':>12} {'ours MiB':>9} {'mem ratio':>9}"
    print(header)
    rows = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            for k in args.ks:
                row = bench_one(shape, k, getattr(torch, dtype_name), tokens, device, repeats)
                rows.append(row)
                print(f"{shape:>12} {k:>4} {row['dtype']:>9} {row['saelens_tok_s']:>14.0f} {row['qscope_tok_s']:>11.0f} "
                      f"{row['speedup']:>7.2f}x {row['gemm_ms']:>8.1f} {row['saelens_peak_mib']:>12.1f} "
                      f"{row['qscope_peak_mib']:>9.1f} {row['memory_ratio']:>9.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
