"""Loading memory and forward speed of HookedTransformer vs the HF model alone, side by side.

For each architecture a mid-size random checkpoint is written once; then, each in a fresh
process (so peak RSS is clean): the HF model alone (``AutoModelForCausalLM.from_pretrained``)
and ``HookedTransformer.from_pretrained_no_processing`` on the same directory. Each worker
reports the peak RSS growth over its post-import baseline and the forward tokens/s.

The memory claim checked here: loading holds no more than one extra layer's weights beyond
what TransformerLens itself must hold (the HF model it converts from, alive during the
conversion, plus its own weights). Column ``beyond (layers)`` = (peak while loading -
resident weights) / one layer's weights, where the resident weights are the HF model's for
the HF row and HF + HookedTransformer for the hooked row (on a GPU: the model's own, as the
HF model stays on the CPU). ``run`` peaks add the forward passes' activations.

Usage: python benchmarks/model_load.py [--arch Qwen3ForCausalLM ...] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch

MID_SIZE = dict(  # ~0.2B parameters: minutes on 2 CPU cores, well inside one GPU
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=3072,
    vocab_size=32768,
    max_position_embeddings=4096,
)
MOE = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=512)
LINEAR = dict(linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=8, linear_num_value_heads=16,
              layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2)
SIZES = {
    "Qwen3ForCausalLM": MID_SIZE,
    "Qwen3MoeForCausalLM": {**MID_SIZE, **MOE, "norm_topk_prob": True},
    "Qwen3_5ForCausalLM": {**MID_SIZE, **LINEAR},
    "Qwen3_5MoeForCausalLM": {**MID_SIZE, **LINEAR, **MOE, "shared_expert_intermediate_size": 512},
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def worker(kind: str, directory: str, device: str, batch: int, seq: int, reps: int) -> dict:
    """Load one way, run forwards, return measurements (runs in its own process)."""
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM

    import qscope_plugins  # noqa: F401  (registers the HookedTransformer integration)
    from transformer_lens import HookedTransformer

    baseline = _current_rss_bytes()  # not the import-time high-water mark
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
        layer_bytes = _weights_bytes(model.model.layers[0])
    else:
        model = HookedTransformer.from_pretrained_no_processing(directory, device=device)
        layer_bytes = _weights_bytes(model.blocks[0])
    load_s = time.perf_counter() - start
    load_peak = _peak_rss_bytes() - baseline

    gpu_load_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids) if kind != "hf" else model(ids, use_cache=False)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first pass is warm-up
                times.append(time.perf_counter() - start)
    times.sort()
    return {
        "kind": kind,
        "load_s": load_s,
        "load_peak_rss": load_peak,
        "run_peak_rss": _peak_rss_bytes() - baseline,  # load and forwards (activations included)
        "gpu_load_peak": gpu_load_peak,
        "gpu_run_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "weights_bytes": _weights_bytes(model),
        "layer_bytes": layer_bytes,
        "tokens_per_s": batch * seq / times[len(times) // 2],
    }


def _run_worker(kind: str, directory: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--dir", directory, "--device", args.device,
           "--batch", str(args.batch), "--seq", str(args.seq), "--reps", str(args.reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"kind": kind, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", choices=("hf", "hooked"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.device, args.batch, args.seq, args.reps)))
        return 0

    from importlib.metadata import version

    from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model

    print(f"device={args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
          f"{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}); torch {torch.__version__}, "
          f"transformers {version('transformers')}, transformer-lens {version('transformer-lens')}; "
          f"threads={torch.get_num_threads()} batch={args.batch} seq={args.seq} fp32")
    memory = "GPU" if args.device == "cuda" else "RSS"
    print(f"{'architecture':24} {'who':7} {'load ' + memory:>9} {'run ' + memory:>9} {'weights':>9} {'load s':>7} "
          f"{'tok/s':>7} {'ratio':>6} {'beyond (layers)':>15}   (memory in MiB)")
    failed = False
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(tiny_model(arch, **SIZES[arch]), directory)  # the tiny config, scaled up
            hf, hooked = (_run_worker(kind, directory, args) for kind in ("hf", "hooked"))
        for row in (hf, hooked):
            if "error" in row:
                failed = True
                print(f"{arch:24} {row['kind']:7} error: {row['error']}")
                continue
            gpu = args.device == "cuda"
            load_peak, run_peak = (row["gpu_load_peak"], row["gpu_run_peak"]) if gpu else (row["load_peak_rss"], row["run_peak_rss"])
            # Weights that must be resident: the model's own; for HookedTransformer on the CPU
            # also the HF model it converts from (on a GPU the HF model stays on the CPU).
            held = row["weights_bytes"]
            ratio = ""
            if row is hooked and "error" not in hf:
                held += 0 if gpu else hf["weights_bytes"]
                ratio = f"{row['tokens_per_s'] / hf['tokens_per_s']:.2f}"
            print(f"{arch:24} {row['kind']:7} {_mib(load_peak)} {_mib(run_peak)} {_mib(row['weights_bytes'])} "
                  f"{row['load_s']:7.1f} {row['tokens_per_s']:7.0f} {ratio:>6} {(load_peak - held) / row['layer_bytes']:15.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
