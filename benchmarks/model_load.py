"""Loading memory and forward speed of HookedTransformer vs the HF model alone, side by side.

For each architecture a mid-size random checkpoint is written once; then, each in a fresh
process (so peak RSS is clean): the HF model alone (``AutoModelForCausalLM.from_pretrained``)
and ``HookedTransformer.from_pretrained_no_processing`` on the same directory. Each worker
reports the peak RSS growth over its post-import baseline and the forward tokens/s.

The memory claim checked here: loading holds no more than one extra layer's weights beyond
what TransformerLens itself must hold (the HF model it converts from plus its own weights).
The hooked worker loads the HF model exactly like the HF worker, restarts peak tracking, then
builds the HookedTransformer from it; ``beyond (layers)`` is that phase's peak growth minus
the HookedTransformer's weights, in units of one block's weights. For the HF row it is the
HF loader's own peak beyond its weights, for comparison. ``run`` peaks include the forward
passes' activations. Linux only (``/proc/self/status``, ``clear_refs``).

``--interleave`` adds a speed-only row per architecture: HF and hooked forwards alternated in one
process (the hooked model built from the HF one), the ratio taken as the median over rounds of
hooked tok/s over HF tok/s, so load that changes during the run affects both alike.

Usage: python benchmarks/model_load.py [--arch Qwen3ForCausalLM ...] [--device cpu|cuda] [--interleave]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from qscope_plugins.testing.tiny_models import ARCHITECTURES, arch_fields, save_checkpoint, tiny_model

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
SIZES = {arch: {**MID_SIZE, **arch_fields(arch, moe=MOE, linear=LINEAR, shared_expert=512)} for arch in ARCHITECTURES}


def _rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last :func:`_reset_peak`), in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak(device: str) -> int:
    """Restart peak tracking (Linux ``clear_refs``); return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return _rss_bytes("VmRSS")


def _peak(device: str, since: int) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM") - since


def _weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def worker(kind: str, directory: str, device: str, batch: int, seq: int, reps: int) -> dict:
    """Load one way, run forwards, return measurements (runs in its own process).

    ``hooked`` loads the HF model first, exactly as ``hf`` does, then hands it to
    HookedTransformer (``hf_model=``), so the conversion's peak is measured on its own.
    """
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM

    import qscope_plugins  # noqa: F401  (registers the HookedTransformer integration)
    from transformer_lens import HookedTransformer

    baseline = _reset_peak(device)
    start = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    # transformers may leave weights as lazily read file mappings; read every one so they are
    # resident and counted here, not later in whichever phase happens to touch them first
    with torch.no_grad():
        sum(float(t.sum()) for t in hf_model.state_dict().values())
    load_peak = _peak("cpu", baseline)
    if kind == "hf":
        model = hf_model.to(device).eval()
        layer_bytes = _weights_bytes(model.model.layers[0])
        beyond = (_peak(device, baseline) - _weights_bytes(model)) / layer_bytes
    else:
        before = _reset_peak(device)
        model = HookedTransformer.from_pretrained_no_processing(directory, hf_model=hf_model, device=device)
        layer_bytes = _weights_bytes(model.blocks[0])
        conversion_peak = _peak(device, before)
        load_peak = max(load_peak, conversion_peak + before - baseline)
        beyond = (conversion_peak - _weights_bytes(model)) / layer_bytes
        del hf_model
    load_s = time.perf_counter() - start

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
        "load_peak": load_peak,
        "run_peak": _peak(device, baseline),  # with the forwards' activations (CPU: since start)
        "beyond_layers": beyond,
        "weights_bytes": _weights_bytes(model),
        "tokens_per_s": batch * seq / times[len(times) // 2],
    }


def speed_worker(directory: str, device: str, batch: int, seq: int, reps: int) -> dict:
    """HF and hooked forwards alternated in one process, so both see the same machine load.

    The hooked model is built from the HF one (views of its weights: little extra memory). Each
    round times one HF and one hooked forward back to back; the ratio is the median over rounds of
    hooked tok/s / HF tok/s, robust to load that changes between rounds."""
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM

    import qscope_plugins  # noqa: F401
    from transformer_lens import HookedTransformer

    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    hooked = HookedTransformer.from_pretrained_no_processing(directory, hf_model=hf_model, device=device)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def timed(run) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    hf_times, hooked_times = [], []
    with torch.no_grad():
        for i in range(reps + 1):
            pair = (timed(lambda: hf_model(ids, use_cache=False)), timed(lambda: hooked(ids)))
            if i:  # the first round is warm-up
                hf_times.append(pair[0])
                hooked_times.append(pair[1])
    ratios = sorted(h / k for h, k in zip(hf_times, hooked_times))
    return {"kind": "speed", "hf_tokens_per_s": batch * seq / sorted(hf_times)[len(hf_times) // 2],
            "hooked_tokens_per_s": batch * seq / sorted(hooked_times)[len(hooked_times) // 2],
            "ratio": ratios[len(ratios) // 2]}


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
    parser.add_argument("--interleave", action="store_true",
                        help="also time HF and hooked forwards alternated in one process (robust to changing load)")
    parser.add_argument("--worker", choices=("hf", "hooked", "speed"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "speed":
        print(json.dumps(speed_worker(args.dir, args.device, args.batch, args.seq, args.reps)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.device, args.batch, args.seq, args.reps)))
        return 0

    from importlib.metadata import version

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
            speed = _run_worker("speed", directory, args) if args.interleave else None
        for row in (hf, hooked):
            if "error" in row:
                failed = True
                print(f"{arch:24} {row['kind']:7} error: {row['error']}")
                continue
            ratio = f"{row['tokens_per_s'] / hf['tokens_per_s']:.2f}" if row is hooked and "error" not in hf else ""
            print(f"{arch:24} {row['kind']:7} {_mib(row['load_peak'])} {_mib(row['run_peak'])} "
                  f"{_mib(row['weights_bytes'])} {row['load_s']:7.1f} {row['tokens_per_s']:7.0f} {ratio:>6} "
                  f"{row['beyond_layers']:15.2f}")
        if speed is not None:
            if "error" in speed:
                failed = True
                print(f"{arch:24} {'alt.':7} error: {speed['error']}")
            else:
                print(f"{arch:24} {'alt.':7} interleaved in one process: HF {speed['hf_tokens_per_s']:.0f} tok/s, "
                      f"hooked {speed['hooked_tokens_per_s']:.0f} tok/s, median ratio {speed['ratio']:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
