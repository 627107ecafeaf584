"""Generation tokens/s with and without steering, side by side; cost of feature discovery (issue 5, item 6).

    python benchmarks/steering.py                                   # CPU, small random Qwen3
    python benchmarks/steering.py --device cuda --hidden 2048 --layers 28 --new-tokens 128
    python benchmarks/steering.py --backend transformer-lens        # or nnsight

A random-weight Qwen3 (``--hidden``, ``--layers``) and a random Qwen-Scope-shaped SAE
(d_sae = 16 x hidden, k = 50) are built in memory. For batch sizes 1 and 32, interleaved over
``--repeats`` runs of the same greedy generation on the same backend, it times:

* ``baseline``: ``backend.generate`` with no intervention (no hooks registered);
* ``additive``: the same with ``additive(sae, feature, alpha)`` at the middle layer on every prompt
  position and generated token (target: at most 3% slower than baseline);
* ``clamp``: SAE clamping (encode + decode per step), for reference.

Throughput counts every decoded position of every row (batch x the batch's longest generation),
so rows that stop at EOS early do not flatter either arm. Feature discovery: ``contrast`` over
``--texts`` texts at one layer, in seconds per 1000 tokens, next to a bare residual capture of the
same texts. Prints JSON with the device, versions and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _common import random_qwen3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=("hf", "transformer-lens", "nnsight"), default="hf")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--texts", type=int, default=64, help="texts per side for the discovery timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from qscope_plugins import QwenScopeSAE
    from qscope_plugins.recipes.discovery import contrast
    from qscope_plugins.recipes.steering import additive, clamp
    from qscope_plugins.testing.sae_files import random_sae_state

    device = torch.device(args.device)
    model, tokenizer = random_qwen3(args.hidden, args.layers, device, args.prompt_length + args.new_tokens)
    backend = make_backend(args.backend, model, tokenizer)
    layer = args.layers // 2
    state = random_sae_state(args.hidden, 16 * args.hidden, seed=0)
    sae = QwenScopeSAE.from_weights(**state, k=50, layer=layer).to(device)
    interventions = {
        "baseline": [],
        "additive": [additive(sae, [3, 11], [8.0, -4.0])],
        "clamp": [clamp(sae, 3, 0.0)],
    }

    gen = torch.Generator().manual_seed(0)

    def random_texts(n: int, length: int) -> list[str]:
        return [tokenizer.decode(torch.randint(3, 250, (length,), generator=gen).tolist()) for _ in range(n)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    generation = {}
    for batch in args.batch_sizes:
        prompts = random_texts(batch, args.prompt_length)
        times = {name: [] for name in interventions}
        positions = {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, ivs in interventions.items():
                sync()
                start = time.perf_counter()
                out = backend.generate(prompts, max_new_tokens=args.new_tokens, interventions=ivs, batch_size=batch)
                sync()
                if repeat:
                    times[name].append(time.perf_counter() - start)
                positions[name] = batch * max(len(g.token_ids) for g in out)
        tps = {name: positions[name] / statistics.median(t) for name, t in times.items()}
        generation[f"batch_{batch}"] = {
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "overhead_vs_baseline": {k: round(1 - v / tps["baseline"], 4) for k, v in tps.items() if k != "baseline"},
        }

    positive, negative = random_texts(args.texts, args.prompt_length), random_texts(args.texts, args.prompt_length)
    n_tokens = sum(len(r) for r in backend.encode(positive + negative))

    def capture_only() -> None:
        for texts in (positive, negative):
            for _ in backend.residuals(texts, [layer], batch_size=16):
                pass

    def discovery() -> None:
        contrast(backend, {layer: sae}, positive, negative, top=20, batch_size=16)

    best = {}
    for name, fn in (("capture_only", capture_only), ("contrast", discovery)):
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - start)
        best[name] = statistics.median(runs)

    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "backend": args.backend,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "model": {"hidden": args.hidden, "layers": args.layers, "d_sae": 16 * args.hidden, "k": 50},
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "generation": generation,
        "discovery": {
            "tokens": n_tokens,
            "seconds_per_1000_tokens": {k: round(1000 * v / n_tokens, 4) for k, v in best.items()},
            "contrast_vs_capture": round(best["contrast"] / best["capture_only"], 3),
        },
    }, indent=2))  # fmt: skip


def make_backend(kind: str, model, tokenizer):
    """``kind`` over the same HF model, so every backend runs identical weights."""
    from qscope_plugins.backends import as_backend, backend_class

    if kind == "transformer-lens":
        from transformer_lens.model_bridge import TransformerBridge

        return as_backend(TransformerBridge.boot_transformers("bench", hf_model=model, tokenizer=tokenizer))
    return backend_class(kind)(model, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
