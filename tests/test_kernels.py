"""Exact Top-k encoding and sparse decoding (qscope_plugins.sae.kernels).

Exactness means: the same sorted values as ``torch.topk`` on the same pre-activations, and
indices that point at those values, distinct per row (which index wins a tie is free).
Integer-valued inputs make every GEMM exact in every dtype, so encoders can be compared bitwise.

Triton kernels run here in Triton's interpreter (``TRITON_INTERPRET=1``, CPU) in one subprocess,
because the flag must be set before the kernels are defined; on CUDA they run at every
Qwen-Scope shape (skipped without a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qscope_plugins.sae.kernels import TRITON_AVAILABLE, decode, decode_method, topk_encode, topk_last_dim
from qscope_plugins.sae.kernels.threshold import group_threshold, plan_selection, threshold_topk

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: Relative decode tolerance per dtype, against an fp64 reference on the same (cast) inputs.
DECODE_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
QWEN_SCOPE_SHAPES = [(2048, 32768), (4096, 65536), (5120, 81920), (2048, 131072)]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and TRITON_AVAILABLE),
                                       reason="needs CUDA and Triton")


def assert_exact_topk(pre: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """``(values, indices)`` is a valid ``torch.topk(pre, k)`` result (ties aside)."""
    assert values.dtype == pre.dtype and indices.dtype == torch.long
    assert torch.equal(values, pre.topk(k, dim=-1).values)
    assert torch.equal(pre.gather(-1, indices), values)
    assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all()), "an index repeats within a row"


def integer_encoder(n: int, d_model: int, d_sae: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Small-integer x, W_enc_rows, b_enc: every pre-activation is an exact integer.

    On CUDA the caller also turns off reduced-precision reductions, so cuBLAS sums in fp32 and
    the pre-activations do not depend on how rows are chunked.
    """
    gen = torch.Generator(device).manual_seed(seed)

    def ints(*shape: int, low: int = -1, high: int = 2) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=gen, device=device).to(dtype)

    return ints(n, d_model), ints(d_sae, d_model), ints(d_sae, low=-4, high=5)


def random_codes(n: int, k: int, d_sae: int, d_model: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Distinct feature ids per row, unit-scale values (about half exact zeros, as after ReLU), decoder rows."""
    gen = torch.Generator(device).manual_seed(seed)
    indices = torch.rand(n, d_sae, generator=gen, device=device).topk(k, dim=-1).indices
    values = torch.randn(n, k, generator=gen, device=device).relu().to(dtype)
    W = (torch.randn(d_sae, d_model, generator=gen, device=device) / d_model**0.5).to(dtype)
    return values, indices, W, torch.randn(d_model, generator=gen, device=device).to(dtype)


def assert_decoded(out: torch.Tensor, values, indices, W, b) -> None:
    ref = torch.zeros(values.shape[0], W.shape[0], dtype=torch.float64, device=W.device)
    ref = ref.scatter_(1, indices, values.double()) @ W.double() + b.double()
    tol = DECODE_TOL[W.dtype]
    assert out.dtype == W.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


# ---------------------------------------------------------------------------------- torch paths (CPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_encode_exact_over_chunks(dtype):
    x, W, b = integer_encoder(37, 24, 300, dtype)
    values, indices = topk_encode(x.reshape(37, 1, 24), W, b, 17, backend="torch", chunk_bytes=5 * 300 * 4)
    assert values.shape == indices.shape == (37, 1, 17)
    assert_exact_topk(torch.addmm(b, x, W.T), values[:, 0], indices[:, 0], 17)


def test_encode_casts_input_to_weight_dtype():
    x, W, b = integer_encoder(5, 16, 64, torch.bfloat16)
    values, _ = topk_encode(x.float(), W, b.float(), 4)
    assert values.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dense", "gather", "embedding_bag", "auto"])
def test_torch_decode_methods(dtype, method):
    values, indices, W, b = random_codes(19, 7, 500, 48, dtype)
    out = decode(values.reshape(19, 1, 7), indices.reshape(19, 1, 7), W, b, method=method, chunk_bytes=4096)
    assert out.shape == (19, 1, 48)
    assert_decoded(out[:, 0], values, indices, W, b)


def test_auto_paths_propagate_gradients_to_the_encoder():
    x, W_enc, b = torch.randn(3, 16), torch.randn(64, 16, requires_grad=True), torch.randn(64)
    values, indices = topk_encode(x, W_enc, b, 4)
    decode(values, indices, torch.randn(64, 16), b[:16]).sum().backward()
    touched = set((W_enc.grad.abs().sum(-1) > 0).nonzero().squeeze(-1).tolist())
    assert touched and touched <= set(indices.flatten().tolist())


def test_cpu_decode_table_prefers_embedding_bag():
    assert {decode_method("cpu", dtype) for dtype in DTYPES} == {"embedding_bag"}


# ---------------------------------------------------------------------------------- threshold algorithm (CPU)
def torch_filter(pre, thresh, counts, cand_values, cand_indices):
    """Reference for the Triton filter kernel: append every entry >= thresh to its row's buffer."""
    cap = cand_values.shape[1]
    for row in range(pre.shape[0]):
        cols = (pre[row] >= thresh[row]).nonzero().squeeze(-1).int()
        start = int(counts[row])
        kept = cols[: max(0, cap - start)]
        cand_values[row, start : start + kept.numel()] = pre[row, kept.long()]
        cand_indices[row, start : start + kept.numel()] = kept
        counts[row] += cols.numel()


def test_plan_selection():
    assert plan_selection(32768, 100).groups == 1024 and plan_selection(32768, 100).cap == 232
    assert plan_selection(32768, 50).groups == 512
    assert plan_selection(2048, 100) is None  # 1024 groups of 2 columns would gain nothing
    assert plan_selection(131072, 128).groups == 1024


def test_group_threshold_is_a_lower_bound_on_kth_value():
    pre = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    kth = pre.topk(10, dim=-1).values[:, -1]
    thresh = group_threshold(pre, 10, 80)  # 80 groups of 12 columns; the last 40 columns in none
    assert bool((thresh <= kth).all()) and bool((thresh < kth).any())


def planted_rows(width: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows plus the hard cases: the top values packed into two groups, NaNs, massive ties."""
    gen = torch.Generator().manual_seed(2)
    pre = torch.randn(6, width, generator=gen)
    pre[1, :64] = 10 + torch.rand(64, generator=gen)  # > cap entries above the threshold
    pre[2, 5] = pre[2, 700] = float("nan")
    pre[3] = (pre[3] * 4).round() / 4  # many ties, still few entries above the threshold
    return pre.to(dtype)


def assert_matches_topk_with_nans(pre, values, indices, k):
    ref_values, ref_indices = pre.topk(k, dim=-1)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)
    finite = ~torch.isnan(pre).any(-1)
    assert_exact_topk(pre[finite], values[finite], indices[finite], k)
    assert torch.equal(indices[~finite][values[~finite].isnan()].sort().values,
                       ref_indices[~finite][ref_values[~finite].isnan()].sort().values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_topk_exact_including_fallback_rows(dtype):
    k, width = 8, 2048
    pre = planted_rows(width, k, dtype)
    plan = plan_selection(width, k)
    counts = (pre >= group_threshold(pre, k, plan.groups)[:, None]).sum(-1)
    assert counts[1] > plan.cap  # the planted row really overflows the buffer
    recomputed = []

    def pre_rows(rows):
        if isinstance(rows, torch.Tensor):
            recomputed.extend(rows.tolist())
        return pre[rows]

    values, indices = threshold_topk(pre_rows, 6, width, k, plan, torch_filter, chunk_rows=4,
                                     dtype=dtype, device=pre.device)
    assert sorted(recomputed) == [1, 2]  # the overflow and NaN rows; every other row from the buffer
    assert_matches_topk_with_nans(pre, values, indices, k)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, W, b: topk_encode(x[:, :3], W, b, 4), "x has last dimension 3 but W_enc_rows (64, 16) expects d_model=16"),
        (lambda x, W, b: topk_encode(x, W, b[:5], 4), "b_enc has shape (5,), expected (64,)"),
        (lambda x, W, b: topk_encode(x, W, b, 0), "k=0 must be in [1, d_sae=64]"),
        (lambda x, W, b: topk_encode(x, W, b, 65), "k=65 must be in [1, d_sae=64]"),
        (lambda x, W, b: topk_encode(x, W.double(), b, 4), "W_enc_rows dtype torch.float64 is not supported (float32, bfloat16, float16)"),
        (lambda x, W, b: topk_encode(x, W[0], b, 4), "W_enc_rows must be 2-D (d_sae, d_model), got shape (16,)"),
        (lambda x, W, b: topk_encode(x, W, b, 4, backend="cuda"), "backend must be 'auto', 'torch' or 'triton', got 'cuda'"),
        (lambda x, W, b: topk_last_dim(x.long(), 4), "pre must be a float32/bfloat16/float16 tensor with a feature dimension, got torch.int64 of shape (3, 16)"),
        (lambda x, W, b: decode(x[:, :4], x[:, :5].long(), W, b[:16]), "values (3, 4) and indices (3, 5) must have one shape (..., k)"),
        (lambda x, W, b: decode(x[:, :4], x[:, :4], W, b[:16]), "indices must be an integer tensor, got torch.float32"),
        (lambda x, W, b: decode(x[:, :4], torch.full((3, 4), 64), W, b[:16]), "feature index out of range [0, 64)"),
        (lambda x, W, b: decode(x[:, :4], torch.full((3, 4), -1), W, b[:16]), "feature index out of range [0, 64)"),
        (lambda x, W, b: decode(x[:, :4], torch.zeros(3, 4, dtype=torch.long), W, b), "b_dec has shape (64,), expected (16,)"),
        (lambda x, W, b: decode(x[:, :4], torch.zeros(3, 4, dtype=torch.long), W, b[:16], method="sparse"),
         "method must be one of auto, dense, gather, embedding_bag, fused; got 'sparse'"),
        (lambda x, W, b: topk_encode(x, W.requires_grad_(), b, 4, backend="triton"),
         "backend='triton' does not propagate gradients: run under torch.no_grad() or detach"),
        (lambda x, W, b: decode(x[:, :4], torch.zeros(3, 4, dtype=torch.long), W.requires_grad_(), b[:16], method="fused"),
         "method='fused' does not propagate gradients: run under torch.no_grad() or detach"),
    ],
)
def test_bad_arguments(call, message):
    x, W, b = torch.randn(3, 16), torch.randn(64, 16), torch.randn(64)
    with pytest.raises(ValueError) as info:
        call(x, W, b)
    assert str(info.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton installed")
def test_triton_backend_on_cpu_tensors_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, b = integer_encoder(2, 8, 4096, torch.float32)
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1\), got cpu$"):
        topk_encode(x, W, b, 4, backend="triton")


# ---------------------------------------------------------------------------------- subprocesses
#: Imports the kernels package without running qscope_plugins/__init__ (framework registration
#: would dominate the run time); the kernels only import each other.
_LIGHT_IMPORT = """
import sys, types
for name, sub in (("qscope_plugins", ""), ("qscope_plugins.sae", "/sae")):
    module = types.ModuleType(name)
    module.__path__ = [sys.argv[1] + "/qscope_plugins" + sub]
    sys.modules[name] = module
"""


def run_light(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", _LIGHT_IMPORT + script, str(REPO), *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_kernels_import_and_run_without_triton():
    script = """
import json, torch
sys.modules["triton"] = None  # make `import triton` fail
from qscope_plugins.sae import kernels
x, W, b = torch.randn(3, 16), torch.randn(4096, 16), torch.randn(4096)
values, indices = kernels.topk_encode(x, W, b, 5)
report = {"available": kernels.TRITON_AVAILABLE, "status": kernels.triton_status(),
          "exact": torch.equal(values, torch.addmm(b, x, W.T).topk(5).values)}
for name, call in (("encode", lambda: kernels.topk_encode(x, W, b, 5, backend="triton")),
                   ("decode", lambda: kernels.decode(values, indices, W, b[:16], method="fused"))):
    try:
        call()
    except RuntimeError as error:
        report[name] = str(error)
print(json.dumps(report))
"""
    report = json.loads(run_light(script))
    assert report["available"] is False
    assert report["status"].startswith("unavailable (")
    assert report["exact"] is True
    assert report["encode"] == "backend='triton' needs Triton: pip install 'qscope-plugins[gpu]'"
    assert report["decode"] == "method='fused' needs Triton: pip install 'qscope-plugins[gpu]'"


_INTERPRETED = """
import torch
from qscope_plugins.sae.kernels import decode, topk_encode, topk_last_dim
from qscope_plugins.sae.kernels._triton import interpreting
from qscope_plugins.sae.kernels import triton_select
cases = torch.load(sys.argv[2], weights_only=True)
out = {"interpreting": interpreting(), "kernel_type": type(triton_select._filter_kernel).__name__}
for name, c in cases.items():
    if name.startswith("encode"):
        out[name] = topk_encode(c["x"], c["W"], c["b"], c["k"], backend="triton")
    elif name.startswith("select"):
        out[name] = topk_last_dim(c["pre"], c["k"], backend="triton")
    elif name.startswith("filter"):
        buffers = (torch.zeros(len(c["pre"]), dtype=torch.int32),
                   torch.full((len(c["pre"]), c["cap"]), float("-inf"), dtype=c["pre"].dtype),
                   torch.full((len(c["pre"]), c["cap"]), -1, dtype=torch.int32))
        triton_select.filter_candidates(c["pre"], c["thresh"], *buffers)
        out[name] = buffers
    else:
        out[name] = decode(c["values"], c["indices"], c["W"], c["b"], method="fused")
torch.save(out, sys.argv[3])
"""


def _interpreter_cases() -> dict:
    cases = {}
    for dtype in DTYPES:
        tag = str(dtype).removeprefix("torch.")
        x, W, b = integer_encoder(20, 32, 1024, dtype, seed=3)
        cases[f"encode_{tag}"] = {"x": x, "W": W, "b": b, "k": 8}
        pre = planted_rows(2048, 8, dtype)
        cases[f"select_{tag}"] = {"pre": pre, "k": 8}
        finite = pre[[0, 1, 3]]
        thresh = finite.topk(8, dim=-1).values[:, -1]
        thresh[1] = finite[1].topk(60).values[-1]  # 60 entries above it, more than the 40 slots
        cases[f"filter_{tag}"] = {"pre": finite, "thresh": thresh, "cap": 40}
        values, indices, W_dec, b_dec = random_codes(20, 8, 1024, 96, dtype, seed=4)
        cases[f"decode_{tag}"] = {"values": values, "indices": indices, "W": W_dec, "b": b_dec}
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs and the Triton interpreter's outputs for every case (one subprocess for all)."""
    if not TRITON_AVAILABLE:
        pytest.skip("Triton is not installed")
    folder = tmp_path_factory.mktemp("interpreter")
    cases = _interpreter_cases()
    torch.save(cases, folder / "cases.pt")
    run_light(_INTERPRETED, str(folder / "cases.pt"), str(folder / "out.pt"), env={"TRITON_INTERPRET": "1"})
    return cases, torch.load(folder / "out.pt", weights_only=True)


def test_interpreter_really_ran(interpreted):
    _, out = interpreted
    assert out["interpreting"] is True and out["kernel_type"] == "InterpretedFunction"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_triton_encode_exact(interpreted, dtype):
    cases, out = interpreted
    tag = str(dtype).removeprefix("torch.")
    c = cases[f"encode_{tag}"]
    values, indices = out[f"encode_{tag}"]
    assert_exact_topk(torch.addmm(c["b"], c["x"], c["W"].T), values, indices, c["k"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_triton_select_exact_with_planted_rows(interpreted, dtype):
    cases, out = interpreted
    tag = str(dtype).removeprefix("torch.")
    assert_matches_topk_with_nans(cases[f"select_{tag}"]["pre"], *out[f"select_{tag}"], 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_filter_kernel_keeps_every_entry_at_or_above_threshold(interpreted, dtype):
    cases, out = interpreted
    tag = str(dtype).removeprefix("torch.")
    c = cases[f"filter_{tag}"]
    counts, cand_values, cand_indices = out[f"filter_{tag}"]
    above = c["pre"] >= c["thresh"][:, None]  # the threshold is itself an entry: ties at it count
    assert torch.equal(counts, above.sum(-1).int())
    for row in range(len(counts)):
        slots = cand_indices[row][cand_indices[row] >= 0].long()
        assert slots.numel() == min(int(counts[row]), c["cap"]) == len(set(slots.tolist()))
        assert bool(above[row, slots].all())
        assert torch.equal(cand_values[row, : slots.numel()].sort().values, c["pre"][row, slots].sort().values)
    assert counts[1] > c["cap"]  # the planted row fills the buffer and stops there


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_fused_decode(interpreted, dtype):
    cases, out = interpreted
    tag = str(dtype).removeprefix("torch.")
    c = cases[f"decode_{tag}"]
    assert_decoded(out[f"decode_{tag}"], c["values"], c["indices"], c["W"], c["b"])


# ---------------------------------------------------------------------------------- CUDA, Qwen-Scope shapes
@pytest.fixture
def exact_cublas(monkeypatch):
    """fp32 accumulation everywhere in cuBLAS (no TF32, no half-precision split-K reductions)."""
    matmul = torch.backends.cuda.matmul
    for flag in ("allow_tf32", "allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
        monkeypatch.setattr(matmul, flag, False)


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [50, 100])
@pytest.mark.parametrize(("d_model", "d_sae"), QWEN_SCOPE_SHAPES)
def test_cuda_triton_encode_exact(d_model, d_sae, k, dtype, exact_cublas):
    x, W, b = integer_encoder(4096, d_model, d_sae, dtype, device="cuda")
    values, indices = topk_encode(x, W, b, k, backend="triton")
    assert_exact_topk(torch.addmm(b, x, W.T), values, indices, k)


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [50, 100])
@pytest.mark.parametrize("d_sae", sorted({d for _, d in QWEN_SCOPE_SHAPES}))
def test_cuda_triton_select_exact_gaussian(d_sae, k, dtype):
    pre = torch.randn(4096, d_sae, device="cuda", generator=torch.Generator("cuda").manual_seed(k)).to(dtype)
    pre[7, :512] += 8  # one row with its top values clustered: exercises the fallback on the GPU too
    assert_exact_topk(pre, *topk_last_dim(pre, k, backend="triton"), k)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_auto_encode_exact(dtype, exact_cublas):
    x, W, b = integer_encoder(1000, 2048, 32768, dtype, device="cuda")
    assert_exact_topk(torch.addmm(b, x, W.T), *topk_encode(x, W, b, 50), 50)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["auto", "dense", "gather", "embedding_bag", "fused"])
@pytest.mark.parametrize(("d_model", "d_sae"), QWEN_SCOPE_SHAPES)
def test_cuda_decode_methods(d_model, d_sae, method, dtype):
    if method == "fused" and not TRITON_AVAILABLE:
        pytest.skip("needs Triton")
    values, indices, W, b = random_codes(1024, 100, d_sae, d_model, dtype, device="cuda")
    assert_decoded(decode(values, indices, W, b, method=method), values, indices, W, b)
