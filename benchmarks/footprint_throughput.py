"""Footprint extraction tokens/s against a bare forward of the same model on the same batches (issue 6, item 6).

    python benchmarks/footprint_throughput.py                        # CPU, small sizes
    python benchmarks/footprint_throughput.py --device cuda --hidden 2048 --layers 28 --texts 512 --length 256

A random-weight Qwen3 (``--hidden``, ``--layers``) and random Qwen-Scope-shaped SAEs (d_sae = 16 x hidden,
k = 50) are built in memory. In one run, interleaved over ``--repeats``, it times:

* ``bare``: ``model(input_ids, attention_mask)`` on the same padded batches, no hooks, no SAE;
* ``footprint_1``: :func:`extract_footprints` at one layer, last token, written to a store;
* ``footprint_all_tokens``: the same with ``position="all"`` (every token encoded, with counts);
* ``footprint_4``: four layers from one forward pass;
* ``capture_middle`` / ``capture_last``: bare residual capture (no SAE) at the middle layer and at
  the last layer. Capture stops after the deepest layer it needs (issue 20, item 5), so a
  middle-layer capture skips the upper half of the model and the LM head: ``capture_middle`` should
  beat ``bare`` and ``capture_last``.

Target: footprint_1 / bare >= 0.7. Prints JSON with the device, versions and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
from _common import random_qwen3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from qscope_plugins import QwenScopeSAE
    from qscope_plugins.backends.hf import HFBackend
    from qscope_plugins.recipes.footprints import extract_footprints
    from qscope_plugins.testing.sae_files import random_sae_state

    device = torch.device(args.device)
    model, tokenizer = random_qwen3(args.hidden, args.layers, device, args.length)
    backend = HFBackend(model, tokenizer)
    layers = [args.layers // 2 + i for i in range(-2, 2)]
    saes = {}
    for layer in layers:
        s = random_sae_state(args.hidden, 16 * args.hidden, seed=layer)
        saes[layer] = QwenScopeSAE.from_weights(s["W_enc"], s["W_dec"], s["b_enc"], s["b_dec"], k=50, layer=layer).to(device)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 250, (args.length,), generator=gen).tolist() for _ in range(args.texts)]
    texts = [tokenizer.decode(r) for r in rows]
    n_tokens = sum(len(r) for r in backend.encode(texts))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare() -> None:
        for start in range(0, len(texts), args.batch_size):
            batch = backend.pad(backend.encode(texts[start : start + args.batch_size]), "right")
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def footprint(chosen, position):
        def run() -> None:
            with tempfile.TemporaryDirectory() as root:
                subset = {n: saes[n] for n in chosen}
                extract_footprints(backend, subset, texts, root, "bench", position=position, batch_size=args.batch_size)

        return run

    def capture(layer: int):
        def run() -> None:
            for _ in backend.residuals(texts, [layer], last_token=True, batch_size=args.batch_size):
                pass

        return run

    cases = {
        "bare": bare,
        "capture_middle": capture(args.layers // 2),
        "capture_last": capture(args.layers - 1),
        "footprint_1": footprint(layers[:1], "last"),
        "footprint_all_tokens": footprint(layers[:1], "all"),
        "footprint_4": footprint(layers, "last"),
    }
    for fn in cases.values():  # warm-up
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    tokens_per_s = {name: n_tokens / seconds for name, seconds in best.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = {
        "device": name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "model": {"hidden": args.hidden, "layers": args.layers, "d_sae": 16 * args.hidden, "k": 50},
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "tokens_per_s": {k: round(v, 1) for k, v in tokens_per_s.items()},
        "ratio_vs_bare": {k: round(v / tokens_per_s["bare"], 3) for k, v in tokens_per_s.items() if k != "bare"},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
