"""Exact Top-k encoding and sparse decoding, side by side with torch and SAELens, in one run.

On CUDA (default: bf16, 8192 tokens, every Qwen-Scope shape from the catalog) it reports per shape:
the bare encoder GEMM, the torch Top-k path, the Triton path, every decode method, SAELens
``TopKSAE`` encode+decode, ours encode+decode (auto choices), the peak extra memory of both
end-to-end calls, and the ratios the targets of issue 10 are stated in. Then the all-layer cost
for a random Qwen3-1.7B-shaped model (28 layers, one 2048x32768 SAE read at every layer) as a
multiple of the bare forward. On CPU it runs a small smoke configuration.

    python benchmarks/topk_kernels.py                   # everything, sized for the device
    python benchmarks/topk_kernels.py --shapes 2048x32768 --tokens 256 --dtypes float32 bfloat16 float16 --no-model

Importable: ``run(...)`` returns the results as a dict (``benchmarks/sae_throughput.py`` can merge them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qscope_plugins.catalog import GROUPS  # noqa: E402
from qscope_plugins.sae.kernels import (  # noqa: E402
    TRITON_AVAILABLE, decode, decode_method, encode_backend, topk_encode, triton_status,
)

DECODE_METHODS = ("dense", "gather", "embedding_bag", "fused")
#: (d_model, d_sae, k) for the CPU smoke run.
CPU_SMOKE_SHAPES = [(256, 4096, 50)]


def qwen_scope_shapes() -> list[tuple[int, int, int]]:
    """Every distinct (d_model, d_sae, k) of the released groups."""
    return sorted({(g.d_model, g.d_sae, g.k) for g in GROUPS})


def environment(device: torch.device) -> dict[str, str]:
    import sae_lens
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "triton": triton_status(),
            "sae_lens": sae_lens.__version__, "transformers": transformers.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (device-synchronised); warm-up runs absorb autotuning."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by ``fn`` beyond what was live before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def random_weights(d_model: int, d_sae: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Encoder and decoder rows with unit-scale pre-activations for unit-scale inputs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def make(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {"W_enc_rows": make(d_sae, d_model, scale=d_model**-0.5), "b_enc": make(d_sae, scale=0.1),
            "W_dec_rows": make(d_sae, d_model, scale=d_model**-0.5), "b_dec": make(d_model, scale=0.1)}


def saelens_sae(w: dict, k: int):
    """A SAELens ``TopKSAE`` sharing the same weights (no copies)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    d_sae, d_model = w["W_enc_rows"].shape
    dtype = str(w["W_enc_rows"].dtype).removeprefix("torch.")
    cfg = TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k, dtype=dtype, device=str(w["W_enc_rows"].device),
                        apply_b_dec_to_input=False, normalize_activations="none")
    sae = TopKSAE(cfg)
    sae.load_state_dict({"W_enc": w["W_enc_rows"].T, "W_dec": w["W_dec_rows"], "b_enc": w["b_enc"],
                         "b_dec": w["b_dec"]}, assign=True)
    return sae


def ours(w: dict, k: int, backend: str = "auto", method: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """Encode+decode through the dispatch (ReLU between, as the SAE class does)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        values, indices = topk_encode(x, w["W_enc_rows"], w["b_enc"], k, backend=backend)
        return decode(values.relu_(), indices, w["W_dec_rows"], w["b_dec"], method=method)

    return run


def _methods(device: torch.device) -> list[str]:
    usable = device.type == "cuda" and TRITON_AVAILABLE
    return [m for m in DECODE_METHODS if m != "fused" or usable]


@torch.inference_mode()
def bench_shape(d_model: int, d_sae: int, k: int, tokens: int, dtype: torch.dtype, device: torch.device,
                repeats: int) -> dict:
    w = random_weights(d_model, d_sae, dtype, device)
    x = torch.randn(tokens, d_model, dtype=dtype, device=device)
    W, b = w["W_enc_rows"], w["b_enc"]
    row: dict = {"shape": f"{d_model}x{d_sae}", "k": k, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
                 "encode_auto": encode_backend(device, d_sae, k), "decode_auto": decode_method(device, dtype)}
    row["gemm_ms"] = time_ms(lambda: torch.addmm(b, x, W.T), device, repeats)
    row["torch_topk_ms"] = time_ms(lambda: topk_encode(x, W, b, k, backend="torch", screen="off"), device, repeats)
    if device.type == "cuda" and TRITON_AVAILABLE and encode_backend(device, d_sae, k) == "triton":
        row["triton_topk_ms"] = time_ms(lambda: topk_encode(x, W, b, k, backend="triton"), device, repeats)
        ref = topk_encode(x, W, b, k, backend="torch", screen="off")
        got = topk_encode(x, W, b, k, backend="triton")
        row["triton_values_equal_torch"] = bool(torch.equal(ref[0], got[0]))
    values, indices = topk_encode(x, W, b, k)
    values.relu_()
    for method in _methods(device):
        row[f"decode_{method}_ms"] = time_ms(
            lambda m=method: decode(values, indices, w["W_dec_rows"], w["b_dec"], method=m), device, repeats)
    sae, mine = saelens_sae(w, k), ours(w, k)
    row["saelens_ms"] = time_ms(lambda: sae.decode(sae.encode(x)), device, repeats)
    row["ours_ms"] = time_ms(lambda: mine(x), device, repeats)
    row["saelens_peak_extra_mib"] = peak_extra_mib(lambda: sae.decode(sae.encode(x)), device)
    row["ours_peak_extra_mib"] = peak_extra_mib(lambda: mine(x), device)
    best_encode = row.get("triton_topk_ms", row["torch_topk_ms"])
    row["encode_vs_gemm"] = best_encode / row["gemm_ms"]
    row["throughput_vs_saelens"] = row["saelens_ms"] / row["ours_ms"]
    if row["ours_peak_extra_mib"] is not None:
        row["memory_vs_saelens"] = row["ours_peak_extra_mib"] / row["saelens_peak_extra_mib"]
    row["fastest_decode"] = min(_methods(device), key=lambda m: row[f"decode_{m}_ms"])
    return row


def qwen3_backbone(d_model: int, n_layers: int, dtype: torch.dtype, device: torch.device, *, smoke: bool):
    """A random-weight Qwen3 backbone (1.7B shape, or a tiny one for the smoke run)."""
    from transformers import Qwen3Config, Qwen3Model

    sizes = (dict(intermediate_size=4 * d_model, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=1000) if smoke else
             dict(intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  vocab_size=151936))
    config = Qwen3Config(hidden_size=d_model, num_hidden_layers=n_layers, max_position_embeddings=4096, **sizes)
    with torch.device(device):
        model = Qwen3Model(config).to(dtype)
    return model.eval()


@torch.inference_mode()
def bench_all_layers(d_model: int, d_sae: int, k: int, n_layers: int, tokens: int, dtype: torch.dtype,
                     device: torch.device, repeats: int, *, smoke: bool) -> dict:
    """Forward with one SAE encode+decode per layer output, as a multiple of the bare forward.

    One set of SAE weights serves every layer (the cost per layer is the same; memory stays small).
    """
    model = qwen3_backbone(d_model, n_layers, dtype, device, smoke=smoke)
    seq = min(tokens, 2048)
    ids = torch.randint(0, model.config.vocab_size, (max(1, tokens // seq), seq), device=device)
    w = random_weights(d_model, d_sae, dtype, device)
    sae = saelens_sae(w, k)
    readers = {"saelens": lambda h: sae.decode(sae.encode(h)), "ours": ours(w, k)}
    result = {"model": f"Qwen3 {n_layers}x{d_model} (random)", "tokens": ids.numel(), "sae": f"{d_model}x{d_sae} k={k}"}
    result["bare_forward_ms"] = time_ms(lambda: model(ids), device, repeats)
    for name, reader in readers.items():
        def hook(_module, _inputs, output, reader=reader):
            hidden = output[0] if isinstance(output, tuple) else output
            reader(hidden.reshape(-1, d_model))

        handles = [layer.register_forward_hook(hook) for layer in model.layers]
        try:
            result[f"{name}_all_layers_ms"] = time_ms(lambda: model(ids), device, repeats)
        finally:
            for handle in handles:
                handle.remove()
        result[f"{name}_vs_bare"] = result[f"{name}_all_layers_ms"] / result["bare_forward_ms"]
    return result


def run(device: str | torch.device | None = None, *, tokens: int | None = None, dtypes: list[str] | None = None,
        shapes: list[tuple[int, int, int]] | None = None, repeats: int | None = None, model: bool = True) -> dict:
    """All measurements for ``device`` (default: CUDA if present); sizes default to the device's config."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    tokens = tokens or (8192 if gpu else 64)
    repeats = repeats or (20 if gpu else 3)
    shapes = shapes or (qwen_scope_shapes() if gpu else CPU_SMOKE_SHAPES)
    out = {"environment": environment(device), "shapes": []}
    for name in dtypes or ["bfloat16"]:
        dtype = getattr(torch, name)
        for d_model, d_sae, k in shapes:
            out["shapes"].append(bench_shape(d_model, d_sae, k, tokens, dtype, device, repeats))
            if gpu:
                torch.cuda.empty_cache()
    if model:
        dtype = getattr(torch, (dtypes or ["bfloat16"])[0])
        dims = (2048, 32768, 50, 28) if gpu else (64, 2048, 16, 2)
        out["all_layers"] = bench_all_layers(*dims, tokens, dtype, device, repeats, smoke=not gpu)
    return out


def _parse_shape(text: str) -> tuple[int, int]:
    d_model, d_sae = text.lower().split("x")
    return int(d_model), int(d_sae)


def _line(row: dict) -> str:
    return ", ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items())


def _print(results: dict) -> None:
    for key, value in results["environment"].items():
        print(f"{key:>12}: {value}")
    for row in [*results["shapes"], *([results["all_layers"]] if "all_layers" in results else [])]:
        print("\n" + _line(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=None, help="d_modelxd_sae, e.g. 2048x32768")
    parser.add_argument("--k", nargs="+", type=int, default=[50, 100], help="k values for --shapes")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-model", action="store_true", help="skip the all-layer model measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (atomically)")
    args = parser.parse_args(argv)
    shapes = [(d, n, k) for d, n in args.shapes for k in args.k] if args.shapes else None
    results = run(args.device, tokens=args.tokens, dtypes=args.dtypes, shapes=shapes, repeats=args.repeats,
                  model=not args.no_model)
    _print(results)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
