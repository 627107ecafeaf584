"""Exact fp32 Top-k encoding screened by a bf16 GEMM (docs/topk.md, "Screened encoding").

For fp32 weights, ``pre = W x + b`` is first computed from bf16 copies of ``x`` and ``W``
(bf16 inputs, fp32 accumulation: 4x faster than the fp32 GEMM on CPUs with avx512_bf16, and
on CUDA tensor cores). Each screened value ``s_j`` is within a bound of the exact ``pre_j``
that follows from the rounding of the inputs, the fp32 accumulation and the rounding of the
output (:func:`row_bounds`). Only the features whose screened value could still put them in
the top-k of *any* fp32 evaluation of ``pre`` are recomputed in fp32 (a sampled GEMM over the
candidates), and the top-k of those recomputed values is returned. Rows where the bound is not
finite, or whose candidates overflow the buffer, take the plain fp32 path. So the result is
the plain fp32 path's up to ties within fp32 rounding, for every input.

Bias: ``x`` is augmented with two ones and ``W`` with two columns ``bf16(b)`` and
``bf16(b - bf16(b))``, so the bias goes through the same GEMM, split so finely that its
rounding is about ``2^-16 |b|``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from .threshold import group_threshold, plan_selection

U_BF16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits, round to nearest)
U_FP32 = 2.0**-24
MIN_NORMAL = 2.0**-126  # below this a kernel may flush inputs or results to zero (DAZ / FTZ)
#: Relative slack on every bound, for the fp64 arithmetic that computes the bounds themselves.
SLACK = 1 + 2.0**-20
#: Columns the bias takes in the augmented GEMM, and the padding multiple of the inner dimension.
BIAS_COLUMNS = 2
PAD = 16


def gamma(n: int, u: float = U_FP32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an n-term sum in any order."""
    return n * u / (1 - n * u)


@dataclass(frozen=True)
class ScreenWeights:
    """The bf16 augmented encoder and the per-weight constants of the bound (all maxima over features)."""

    w_aug: torch.Tensor
    """``(d_sae, n_pad)`` bf16: ``[bf16(W), bf16(b), bf16(b - bf16(b)), 0...]``."""
    err_max: float
    """``max_j || (W_j, b_j) - (augmented bf16 row j, summed bias) ||_2``: the weights' rounding."""
    hi_max: float
    """``max_j ||augmented bf16 row j||_2``."""
    w_max: float
    """``max_j ||(W_j, b_j)||_2`` (for the fp32 reference's own error)."""
    d_model: int

    @property
    def n_terms(self) -> int:
        return self.w_aug.shape[1]


def padded_terms(d_model: int) -> int:
    """Inner dimension of the augmented GEMM: ``d_model`` plus the bias columns, padded."""
    return -(-(d_model + BIAS_COLUMNS) // PAD) * PAD


def prepare(W_rows: torch.Tensor, b: torch.Tensor, block_rows: int = 4096) -> ScreenWeights:
    """Build the bf16 augmented encoder and its constants (one pass over ``W_rows``, in blocks)."""
    d_sae, d_model = W_rows.shape
    n_pad = padded_terms(d_model)
    w_aug = torch.zeros(d_sae, n_pad, dtype=torch.bfloat16, device=W_rows.device)
    err2 = hi2 = w2 = 0.0
    with torch.no_grad():
        for start in range(0, d_sae, block_rows):
            rows = slice(start, start + block_rows)
            W, bias = W_rows[rows].float(), b[rows].float()
            hi = W.bfloat16()
            b_hi = bias.bfloat16()
            b_lo = (bias - b_hi.float()).bfloat16()
            w_aug[rows, :d_model] = hi
            w_aug[rows, d_model] = b_hi
            w_aug[rows, d_model + 1] = b_lo
            bias_err = bias.double() - b_hi.double() - b_lo.double()
            e = ((W.double() - hi.double()).square().sum(-1) + bias_err.square())
            h = (hi.double().square().sum(-1) + b_hi.double().square() + b_lo.double().square())
            f = (W.double().square().sum(-1) + bias.double().square())
            err2, hi2, w2 = max(err2, float(e.max())), max(hi2, float(h.max())), max(w2, float(f.max()))
    return ScreenWeights(w_aug, math.sqrt(err2) * SLACK, math.sqrt(hi2) * SLACK, math.sqrt(w2) * SLACK, d_model)


# ------------------------------------------------------------------------------------------ cache
#: id(owning weight tensor) -> (signature, weakref to the weights, weakref to the bias, prepared).
_CACHE: dict[int, tuple[tuple, weakref.ref, weakref.ref, ScreenWeights]] = {}


def _owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor at the root of ``t``'s view chain (a transposed parameter's ``_base``)."""
    while t._base is not None:
        t = t._base
    return t


def cached_prepare(W_rows: torch.Tensor, b: torch.Tensor) -> ScreenWeights:
    """:func:`prepare`, kept while the weights live and are not modified in place.

    One entry per weight tensor, dropped when that tensor is freed; an entry is reused only for
    the same tensor objects at the same version counters and view geometry, so an in-place update
    or a new tensor in reused memory never meets a stale bf16 copy. Inference tensors have no
    version counter, so they are prepared afresh on every call (``screen="auto"`` skips them).
    """
    owner, b_owner = _owner(W_rows), _owner(b)
    if owner.is_inference() or b_owner.is_inference():
        return prepare(W_rows, b)  # no version counter: a cached copy could silently go stale
    signature = (owner._version, W_rows.data_ptr(), tuple(W_rows.shape), tuple(W_rows.stride()),
                 b_owner._version, b.data_ptr(), tuple(b.shape), str(W_rows.device))
    hit = _CACHE.get(id(owner))
    if hit is not None and hit[0] == signature and hit[1]() is owner and hit[2]() is b_owner:
        return hit[3]
    prepared = prepare(W_rows, b)
    if hit is None or hit[1]() is not owner:
        weakref.finalize(owner, _CACHE.pop, id(owner), None)
    _CACHE[id(owner)] = (signature, weakref.ref(owner), weakref.ref(b_owner), prepared)
    return prepared


def clear_cache() -> None:
    """Drop every prepared bf16 encoder (each costs half its fp32 encoder's memory)."""
    _CACHE.clear()


# ------------------------------------------------------------------------------------------ GEMM
def _screen_gemm(x_aug: torch.Tensor, w_aug: torch.Tensor) -> tuple[torch.Tensor, float]:
    """bf16 x bf16 with fp32 accumulation, returned as fp32, and the unit roundoff of its output."""
    if x_aug.device.type == "cuda":
        # fp32 output: no output rounding, and no bf16 split-K reduction (which a bf16 output allows).
        return torch.mm(x_aug, w_aug.T, out_dtype=torch.float32), U_FP32
    # CPU (oneDNN): fp32 accumulation, output rounded once to bf16; the bound includes that rounding.
    return (x_aug @ w_aug.T).float(), U_BF16


def _augment(x: torch.Tensor, n_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[bf16(x), 1, 1, 0...]`` and the input rounding ``x - bf16(x)`` (exact in fp32)."""
    rows, d_model = x.shape
    out = torch.zeros(rows, n_pad, dtype=torch.bfloat16, device=x.device)
    out[:, :d_model] = x
    out[:, d_model:d_model + BIAS_COLUMNS] = 1
    return out, x - out[:, :d_model].float()


@lru_cache(maxsize=None)
def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX): then the screen is ~4x the fp32 GEMM."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@lru_cache(maxsize=None)
def accumulates_in_fp32(device: str, n_terms: int) -> bool:
    """Probe: does this device's bf16 GEMM keep an fp32 accumulator over ``n_terms``?

    The sum ``1 + (n-1) 2^-9`` loses every small term in a bf16 accumulator and none in fp32; the
    bound assumes fp32 accumulation, so the screen is used only where this probe passes.
    """
    a = torch.full((2, n_terms), 2.0**-9, dtype=torch.bfloat16, device=device)
    a[:, 0] = 1
    w = torch.ones(3, n_terms, dtype=torch.bfloat16, device=device)
    try:
        out, u_out = _screen_gemm(a, w)
    except (TypeError, RuntimeError, NotImplementedError):  # e.g. no mm(out_dtype=) for this device
        return False
    exact = 1 + (n_terms - 1) * 2.0**-9
    return bool(((out.double() - exact).abs() <= 2 * u_out * exact + gamma(n_terms) * exact).all())


# ------------------------------------------------------------------------------------------ bound
def row_bounds(x: torch.Tensor, dx: torch.Tensor, xa: torch.Tensor, sw: ScreenWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``A`` (screen error before output rounding) and ``eps`` (fp32 reference error), fp64.

    With ``x̄ = (x, 1, 1)``, ``w̄_j`` the exact augmented row and ``ĥ`` the bf16 ones,
    ``x̄·w̄_j - x̂·ĥ_j = x̄·(w̄_j - ĥ_j) + (x̄ - x̂)·ĥ_j``, so by Cauchy-Schwarz
    ``|error| <= ||x̄|| err_max + ||dx|| hi_max``; the fp32 accumulation of the ``n`` exact
    bf16 products adds ``gamma_n ||x̂|| hi_max``; flushed subnormals add at most
    ``2^-126 (sqrt(n) (||x̂|| + hi_max) + 2n + 2)``. The fp32 reference ``addmm`` errs by at
    most ``gamma_{d+1} ||(x, 1)|| w_max`` plus ``(d + 2) 2^-149`` for gradual underflow.
    """
    n = sw.n_terms
    sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).square()
    nx = (sq + BIAS_COLUMNS).sqrt()
    nd = torch.linalg.vector_norm(dx, dim=-1, dtype=torch.float64)
    nxh = torch.linalg.vector_norm(xa, dim=-1, dtype=torch.float64)
    A = nx * sw.err_max + nd * sw.hi_max + gamma(n) * nxh * sw.hi_max
    A = (A + MIN_NORMAL * (math.sqrt(n) * (nxh + sw.hi_max) + 2 * n + 2)) * SLACK
    nx1 = (sq + 1).sqrt()
    eps = (gamma(sw.d_model + 1) * nx1 * sw.w_max + (sw.d_model + 2) * 2.0**-149) * SLACK
    return A, eps


def candidate_floor(lower_kth: torch.Tensor, A: torch.Tensor, eps: torch.Tensor, u_out: float) -> torch.Tensor:
    """The fp32 screen value at and above which a feature is a candidate (fp64 in, fp32 out, rounded down).

    The screen ``s`` of a feature with exact value ``p`` satisfies ``|s - p| <= A + u'|s|``
    (``u' = u/(1-u)``, output rounding), so ``lo(s) = s - u'|s| - A <= p <= hi(s) = s + u'|s| + A``,
    both increasing in ``s``. ``L = lo(kth screen value) <= T_k(p)``. Any fp32 evaluation ``q``
    (``|q - p| <= eps``) has ``T_k(q) >= L - eps``, so a member of its top-k has ``p >= L - 2 eps``
    and ``hi(s) >= L - 2 eps``: the candidates are ``s >= hi^-1(L - 2 eps)``.
    """
    up = u_out / (1 - u_out)
    s = lower_kth.double()
    L = s - up * s.abs() - A
    y = L - 2 * eps - A
    floor = torch.where(y >= 0, y / (1 + up), y / (1 - up))
    floor = floor - (floor.abs() * 2.0**-20 + 2.0**-140)  # slack for this fp64 arithmetic
    return floor.float().nextafter(torch.tensor(float("-inf"), device=floor.device))


# ------------------------------------------------------------------------------------------ encode
def recompute(x: torch.Tensor, W_rows: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              pairs_per_block: int = 1 << 14, sampled: bool | None = None) -> torch.Tensor:
    """fp32 ``x[rows[p]] . W_rows[cols[p]]`` for every pair ``p``.

    CPU: one sampled GEMM (``torch.sparse.sampled_addmm``) over the pairs sorted by feature, so
    each candidate's weight row is read once for all the rows that need it (4x faster than row
    order, where every pair fetches its weight row from memory). CUDA: gathered rows and a
    batched dot, ``pairs_per_block`` pairs at a time. ``sampled`` forces one of the two.
    """
    if sampled if sampled is not None else x.device.type == "cpu":
        n_rows, width = x.shape[0], W_rows.shape[0]
        order = (cols * n_rows + rows).argsort()
        crow = torch.searchsorted(cols[order], torch.arange(width + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(crow, rows[order], torch.zeros(order.numel(), dtype=x.dtype),
                                              size=(width, n_rows), check_invariants=False)
            by_feature = torch.sparse.sampled_addmm(pattern, W_rows, x.T).values()
        return torch.empty_like(by_feature).index_put_((order,), by_feature)
    out = torch.empty(cols.numel(), dtype=x.dtype, device=x.device)
    for start in range(0, cols.numel(), pairs_per_block):
        part = slice(start, start + pairs_per_block)
        out[part] = torch.linalg.vecdot(W_rows[cols[part]], x[rows[part]])
    return out


def screen_chunk(
    x: torch.Tensor, k: int, sw: ScreenWeights, cap: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of one chunk of fp32 rows: ``(rows, cols, ok)``, pairs row-sorted.

    Rows with ``ok`` False cannot be settled by the screen (non-finite values or bound, fewer than
    ``k`` or more than ``cap`` candidates) and have no pairs.
    """
    n_rows, width = x.shape[0], sw.w_aug.shape[0]
    xa, dx = _augment(x, sw.n_terms)
    s, u_out = _screen_gemm(xa, sw.w_aug)
    A, eps = row_bounds(x, dx, xa, sw)
    plan = plan_selection(width, k)
    # A lower bound on the k-th screened value: the k-th of the group maxima (threshold.py), or the
    # exact k-th for narrow rows. A lower floor only adds candidates, so either is exact.
    kth = group_threshold(s, k, plan.groups) if plan is not None else s.topk(k, dim=-1).values[:, -1]
    floor = candidate_floor(kth, A, eps, u_out)
    pairs = (s >= floor[:, None]).nonzero()
    rows, cols = pairs[:, 0], pairs[:, 1]
    counts = torch.bincount(rows, minlength=n_rows)
    # A NaN or infinite screen (non-finite input or weights, overflow) voids the bound for its row;
    # a row sum is finite only if every entry is (or overflows: then the row is redone, still exact).
    ok = (counts >= k) & (counts <= cap) & torch.isfinite(A) & torch.isfinite(floor) & torch.isfinite(s.sum(-1))
    if not bool(ok.all()):
        keep = ok[rows]
        rows, cols = rows[keep], cols[keep]
    return rows, cols, ok


def select_from_candidates(
    x: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor, k: int,
    rows: torch.Tensor, cols: torch.Tensor, ok: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 recompute of the row-sorted candidate pairs and the top-k of each row: ``(values, indices, ok)``."""
    n_rows = x.shape[0]
    exact = recompute(x, W_rows, rows, cols) + b[cols]
    ok = ok.clone()
    ok[rows[~torch.isfinite(exact)]] = False  # overflow in fp32: the plain path decides
    counts = torch.bincount(rows, minlength=n_rows)
    pos = torch.arange(rows.numel(), device=x.device) - (counts.cumsum(0) - counts)[rows]
    slots = max(int(counts.max()) if counts.numel() else 0, k)
    padded = torch.full((n_rows, slots), float("-inf"), dtype=x.dtype, device=x.device)
    padded[rows, pos] = exact
    padded_cols = torch.zeros((n_rows, slots), dtype=torch.long, device=x.device)
    padded_cols[rows, pos] = cols
    values, picked = padded.topk(k, dim=-1)
    return values, padded_cols.gather(-1, picked), ok


def screened_chunk(
    x: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor, k: int, sw: ScreenWeights, cap: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of fp32 rows: ``(values, indices, exact)``; rows with ``exact`` False are not done."""
    return select_from_candidates(x, W_rows, b, k, *screen_chunk(x, k, sw, cap))


def screened_topk_encode(
    x: torch.Tensor, W_rows: torch.Tensor, b: torch.Tensor, k: int, chunk_rows: int,
    sw: ScreenWeights | None = None, recompute_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 ``topk(x @ W_rows.T + b, k)`` (sorted) via the bf16 screen; ``x`` is 2-D fp32.

    The screen runs ``chunk_rows`` rows at a time; the candidates of up to ``recompute_rows`` rows
    are recomputed together (more rows per weight row read).
    """
    sw = sw or cached_prepare(W_rows, b)
    cap = max(8 * k, 1024)
    n_rows = x.shape[0]
    values = torch.empty(n_rows, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n_rows, k, dtype=torch.long, device=x.device)
    block = max(recompute_rows, chunk_rows)
    for start in range(0, n_rows, block):
        xb = x[start:start + block]
        found = [screen_chunk(xb[i:i + chunk_rows], k, sw, cap) for i in range(0, xb.shape[0], chunk_rows)]
        offsets = range(0, xb.shape[0], chunk_rows)
        rows = torch.cat([r + offset for (r, _, _), offset in zip(found, offsets, strict=True)])
        cols = torch.cat([c for _, c, _ in found])
        ok = torch.cat([o for _, _, o in found])
        v, i, ok = select_from_candidates(xb, W_rows, b, k, rows, cols, ok)
        redo = (~ok).nonzero().squeeze(-1)
        if redo.numel():  # the plain fp32 path for rows the screen cannot settle
            v[redo], i[redo] = torch.addmm(b, xb[redo], W_rows.T).topk(k, dim=-1)
        values[start:start + block], indices[start:start + block] = v, i
    return values, indices
