"""The two entry points the SAE class calls: exact Top-k encoding and sparse decoding.

Each picks its implementation from the device, dtype and shape (``backend`` / ``method`` force
one, for benchmarks and tests):

* encoding of fp32 weights, on CPUs with native bf16 (avx512_bf16 / AMX) and on CUDA GPUs with
  bf16 tensor cores: the bf16-screened exact encoder of :mod:`.screen` (a bf16 GEMM bounds every
  pre-activation, only the features that could reach the top-k are recomputed in fp32); the
  result is the fp32 path's up to ties within fp32 rounding. ``screen="off"`` turns it off.
* otherwise, on CUDA with Triton installed, the threshold filter of :mod:`.threshold` (cuBLAS
  GEMM per chunk of rows, then two memory-speed reads instead of ``torch.topk``'s radix passes);
  otherwise ``addmm`` + ``torch.topk`` over row chunks. Both are exact: same values and indices
  as ``torch.topk`` on the same pre-activations, ties aside.
* decoding: the method measured fastest for the device and dtype (:data:`DECODE_TABLE`).

Inputs are cast to the weights' dtype, which is also the dtype of the results. The Triton paths
carry no autograd graph, so ``auto`` takes the torch path whenever a gradient must flow: call
under ``torch.no_grad()`` / ``torch.inference_mode()`` (or with detached weights) to get them.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import screen as screening
from . import torch_ops
from ._triton import TRITON_AVAILABLE, interpreting
from .threshold import SelectPlan, plan_selection, threshold_topk

Backend = Literal["auto", "torch", "triton"]
Screen = Literal["auto", "on", "off"]

#: ``screen="auto"`` screens only where the bf16 GEMM's saving outweighs the candidate recompute:
#: wide SAEs, enough rows to fill a GEMM, and a model dimension where bf16 GEMMs run at full speed.
SCREEN_MIN_WIDTH = 8192
SCREEN_MIN_D_MODEL = 256
SCREEN_MIN_ROWS = 16
#: Default bound on one chunk of screened pre-activations on CPU (fp32; the bf16 output adds half).
SCREEN_CPU_CHUNK_BYTES = 64 << 20
DecodeMethod = Literal["auto", "dense", "gather", "embedding_bag", "fused"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Fastest decode per (device type, dtype); the measurements are in docs/topk.md.
#: CPU: measured (benchmarks/topk_kernels.py): embedding_bag beats gather and dense in every dtype.
#: CUDA bf16: measured in issue 10 on an H100: dense beat embedding_bag (5.8 vs 8.1 ms encode+decode);
#: fp16 is taken to behave like bf16. CUDA fp32: not measured; a dense fp32 GEMM gets no tensor
#: cores (TF32 is off by default) while a gather only moves twice the bytes, so embedding_bag.
#: "fused" (Triton) is not measured on a GPU yet: the benchmark prints the fastest method per row.
DECODE_TABLE: dict[tuple[str, torch.dtype], str] = {
    **{("cpu", dtype): "embedding_bag" for dtype in DTYPES},
    ("cuda", torch.bfloat16): "dense",
    ("cuda", torch.float16): "dense",
    ("cuda", torch.float32): "embedding_bag",
}


def _check_rows(name: str, W: torch.Tensor, b: torch.Tensor, b_name: str, bias_dim: int) -> None:
    if W.ndim != 2:
        raise ValueError(f"{name} must be 2-D (d_sae, d_model), got shape {tuple(W.shape)}")
    if W.dtype not in DTYPES:
        raise ValueError(f"{name} dtype {W.dtype} is not supported (float32, bfloat16, float16)")
    if b.shape != (W.shape[bias_dim],):
        raise ValueError(f"{b_name} has shape {tuple(b.shape)}, expected ({W.shape[bias_dim]},)")


def _check_device(name: str, t: torch.Tensor, W: torch.Tensor, w_name: str) -> None:
    if t.device != W.device:
        raise ValueError(f"{name} is on {t.device} but {w_name} is on {W.device}")


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _require_triton(label: str, device: torch.device, grad: bool) -> None:
    """Errors for a forced Triton path that cannot run here."""
    if grad:
        raise ValueError(f"{label} does not propagate gradients: run under torch.no_grad() or detach")
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{label} needs Triton: pip install 'qscope-plugins[gpu]'")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{label} needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _encode_plan(backend: str, device: torch.device, width: int, k: int, grad: bool = False) -> SelectPlan | None:
    """The threshold plan to run, or None for the torch path (also whenever gradients must flow)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return None
    plan = plan_selection(width, k)
    if backend == "auto":
        return plan if TRITON_AVAILABLE and device.type == "cuda" and not grad else None
    _require_triton("backend='triton'", device, grad)
    if plan is None:
        raise ValueError(f"width {width} is too small for the Triton Top-k with k={k}: use backend='torch'")
    return plan


def encode_backend(device: torch.device | str, width: int, k: int) -> str:
    """Which path ``topk_encode(..., backend="auto")`` takes for this device, d_sae and k."""
    return "torch" if _encode_plan("auto", torch.device(device), width, k) is None else "triton"


def _screen_fast_here(device: torch.device) -> bool:
    """Whether bf16 GEMMs on this device beat fp32 ones by the margin the screen needs."""
    if device.type == "cpu":
        return screening.cpu_has_bf16_dot()
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def _use_screen(screen: str, backend: str, device: torch.device, dtype: torch.dtype, d_model: int,
                d_sae: int, rows: int, grad: bool) -> bool:
    """Whether :func:`topk_encode` takes the bf16-screened path (``screen="on"`` errors where it cannot)."""
    if screen not in ("auto", "on", "off"):
        raise ValueError(f"screen must be 'auto', 'on' or 'off', got {screen!r}")
    if screen == "off":
        return False
    reason = None
    if dtype != torch.float32:
        reason = f"float32 weights (got {dtype})"
    elif grad:
        reason = "no gradient: run under torch.no_grad() or detach"
    elif backend == "triton":
        reason = "backend='auto' or 'torch' (backend='triton' filters fp32 pre-activations)"
    elif device.type not in ("cpu", "cuda"):
        reason = f"a CPU or CUDA device (got {device})"
    elif not screening.accumulates_in_fp32(str(device), screening.padded_terms(d_model)):
        reason = f"a bf16 GEMM that accumulates in fp32 on {device} (the probe found otherwise)"
    if screen == "on":
        if reason is not None:
            raise ValueError(f"screen='on' needs {reason}")
        return True
    return (reason is None and d_sae >= SCREEN_MIN_WIDTH and d_model >= SCREEN_MIN_D_MODEL
            and rows >= SCREEN_MIN_ROWS and _screen_fast_here(device))


def encode_screened(device: torch.device | str, d_model: int, d_sae: int, rows: int = 1024,
                    dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``topk_encode(..., screen="auto")`` takes the bf16-screened path for this call shape."""
    return _use_screen("auto", "auto", torch.device(device), dtype, d_model, d_sae, rows, False)


def _threshold(pre_rows, n_rows: int, width: int, k: int, plan: SelectPlan, dtype: torch.dtype,
               device: torch.device, chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_select import filter_candidates

    rows = torch_ops.chunk_rows(width * dtype.itemsize, chunk_bytes)
    return threshold_topk(pre_rows, n_rows, width, k, plan, filter_candidates,
                          chunk_rows=rows, dtype=dtype, device=device)


def topk_encode(
    x: torch.Tensor, W_enc_rows: torch.Tensor, b_enc: torch.Tensor, k: int, *,
    backend: Backend = "auto", chunk_bytes: int | None = None, screen: Screen = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x @ W_enc_rows.T + b_enc, k)``: values ``(..., k)`` sorted descending, int64 indices.

    ``W_enc_rows`` is ``(d_sae, d_model)`` (row j encodes feature j, the released layout). No ReLU:
    the caller applies it. ``chunk_bytes`` bounds the pre-activations held at once.
    ``screen``: ``"auto"`` takes the bf16-screened exact path for fp32 weights where it is faster
    (:func:`encode_screened`), ``"on"`` forces it (an error where it cannot run), ``"off"`` never.
    Screened results equal the fp32 path's up to ties within fp32 rounding (docs/topk.md); the
    first screened call per weight tensor keeps a bf16 copy of it (half its size) while it lives.
    """
    _check_rows("W_enc_rows", W_enc_rows, b_enc, "b_enc", 0)
    for name, t in (("x", x), ("b_enc", b_enc)):
        _check_device(name, t, W_enc_rows, "W_enc_rows")
    d_sae, d_model = W_enc_rows.shape
    if x.shape[-1:] != (d_model,):
        raise ValueError(f"x has last dimension {x.shape[-1] if x.ndim else None} but W_enc_rows "
                         f"{tuple(W_enc_rows.shape)} expects d_model={d_model}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k={k} must be in [1, d_sae={d_sae}]")
    dtype = W_enc_rows.dtype
    flat = x.reshape(-1, d_model).to(dtype)
    bias = b_enc.to(dtype)
    grad = _needs_grad(x, W_enc_rows, b_enc)
    budget = chunk_bytes or torch_ops.default_chunk_bytes(x.device)
    if (flat.shape[0] and _use_screen(screen, backend, x.device, dtype, d_model, d_sae, flat.shape[0], grad)
            and (screen == "on" or not (W_enc_rows.is_inference() or b_enc.is_inference()))):
        # Fewer, larger chunks on CPU: the screen's bookkeeping is many small ops per chunk.
        screen_budget = chunk_bytes or max(budget, SCREEN_CPU_CHUNK_BYTES if x.device.type == "cpu" else budget)
        rows = torch_ops.chunk_rows(d_sae * 4, screen_budget)
        values, indices = screening.screened_topk_encode(flat, W_enc_rows, bias, k, rows)
        shape = (*x.shape[:-1], k)
        return values.reshape(shape), indices.reshape(shape)
    plan = _encode_plan(backend, x.device, d_sae, k, grad)
    if plan is None or flat.shape[0] == 0:
        values, indices = torch_ops.topk_encode(flat, W_enc_rows, bias, k, budget)
    else:
        values, indices = _threshold(lambda rows: torch.addmm(bias, flat[rows], W_enc_rows.T), flat.shape[0],
                                     d_sae, k, plan, dtype, x.device, budget)
    shape = (*x.shape[:-1], k)
    return values.reshape(shape), indices.reshape(shape)


def topk_last_dim(pre: torch.Tensor, k: int, *, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(pre, k, dim=-1)`` (sorted) for pre-activations already in memory."""
    if pre.dtype not in DTYPES or pre.ndim == 0:
        raise ValueError(f"pre must be a float32/bfloat16/float16 tensor with a feature dimension, "
                         f"got {pre.dtype} of shape {tuple(pre.shape)}")
    width = pre.shape[-1]
    if not 1 <= k <= width:
        raise ValueError(f"k={k} must be in [1, {width}]")
    plan = _encode_plan(backend, pre.device, width, k, _needs_grad(pre))
    flat = pre.reshape(-1, width)
    if plan is None or flat.shape[0] == 0:
        return pre.topk(k, dim=-1)
    values, indices = _threshold(lambda rows: flat[rows], flat.shape[0], width, k, plan, pre.dtype,
                                 pre.device, chunk_bytes=flat.numel() * pre.element_size())
    shape = (*pre.shape[:-1], k)
    return values.reshape(shape), indices.reshape(shape)


def decode_method(device: torch.device | str, dtype: torch.dtype) -> str:
    """The decode ``method="auto"`` uses for this device and dtype (see :data:`DECODE_TABLE`)."""
    device_type = torch.device(device).type
    method = DECODE_TABLE.get((device_type, dtype), "dense")
    if method == "embedding_bag" and not torch_ops.embedding_bag_supported(device_type, dtype):
        return "gather"
    return method


def decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec_rows: torch.Tensor, b_dec: torch.Tensor, *,
    method: DecodeMethod = "auto", chunk_bytes: int | None = None,
) -> torch.Tensor:
    """``x_hat = sum_i values[..., i] * W_dec_rows[indices[..., i]] + b_dec``, shape ``(..., d_model)``.

    ``W_dec_rows`` is ``(d_sae, d_model)`` (row j = direction of feature j). ``chunk_bytes``
    bounds the intermediate of the dense and gather methods.
    """
    _check_rows("W_dec_rows", W_dec_rows, b_dec, "b_dec", 1)
    for name, t in (("values", values), ("indices", indices), ("b_dec", b_dec)):
        _check_device(name, t, W_dec_rows, "W_dec_rows")
    if values.shape != indices.shape or values.ndim == 0:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape (..., k)")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    d_sae, d_model = W_dec_rows.shape
    if indices.numel() and bool(((indices < 0) | (indices >= d_sae)).any()):
        raise ValueError(f"feature index out of range [0, {d_sae})")
    if method not in ("auto", "dense", "gather", "embedding_bag", "fused"):
        raise ValueError(f"method must be one of auto, dense, gather, embedding_bag, fused; got {method!r}")
    dtype = W_dec_rows.dtype
    flat_v = values.reshape(-1, values.shape[-1]).to(dtype)
    flat_i = indices.reshape(-1, indices.shape[-1])
    chosen = decode_method(W_dec_rows.device, dtype) if method == "auto" else method
    bias = b_dec.to(dtype)
    budget = chunk_bytes or torch_ops.default_chunk_bytes(W_dec_rows.device)
    if chosen == "fused":
        _require_triton("method='fused'", W_dec_rows.device, _needs_grad(values, W_dec_rows, b_dec))
        from .triton_decode import decode_fused

        out = decode_fused(flat_v, flat_i, W_dec_rows, bias) if flat_v.shape[0] else bias.expand(0, d_model)
    elif chosen == "embedding_bag":
        out = torch_ops.decode_embedding_bag(flat_v, flat_i, W_dec_rows, bias)
    elif chosen == "gather":
        out = torch_ops.decode_gather(flat_v, flat_i, W_dec_rows, bias, budget)
    else:
        out = torch_ops.decode_dense(flat_v, flat_i, W_dec_rows, bias, budget)
    return out.reshape(*values.shape[:-1], d_model)
