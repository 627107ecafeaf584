"""The bf16-screened exact fp32 Top-k encoder (qscope_plugins.sae.kernels.screen, docs/topk.md).

Two properties are tested on adversarial inputs:

* the bound: every screened value is within ``A + u'|s|`` of the exact (fp64) pre-activation;
* exactness: the selected features are an fp32 top-k (values within the fp32 error of the exact
  ones, nothing left out that is larger by more than the fp32 error), and they equal the plain
  fp32 path's except on ties within fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from qscope_plugins import QwenScopeSAE
from qscope_plugins.sae.kernels import encode_screened, topk_encode
from qscope_plugins.sae.kernels import screen as S

pytestmark = pytest.mark.skipif(not S.accumulates_in_fp32("cpu", 64), reason="this CPU's bf16 GEMM does not accumulate in fp32")


def exact_pre(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.double() @ W.double().T + b.double()


def fp32_error(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the bound on any fp32 evaluation's error (the ``eps`` of row_bounds, recomputed here)."""
    n = W.shape[1] + 1
    w_max = float((W.double().square().sum(-1) + b.double().square()).sqrt().max())
    return S.gamma(n) * (x.double().square().sum(-1) + 1).sqrt() * w_max + n * 2.0**-149


def assert_fp32_topk(x, W, b, values, indices, k, plain=None):
    """``(values, indices)`` is a top-k of some fp32 evaluation of ``x @ W.T + b``, and matches ``plain``."""
    p = exact_pre(x, W, b)
    eps = fp32_error(x, W, b)[:, None]
    assert indices.dtype == torch.long and values.dtype == torch.float32
    assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all()), "an index repeats within a row"
    assert bool((values.diff(dim=-1) <= 0).all()), "values are not sorted"
    picked = p.gather(-1, indices)
    assert bool(((values.double() - picked).abs() <= eps).all()), "a value is not an fp32 evaluation"
    outside = p.scatter(-1, indices, float("-inf")).amax(-1, keepdim=True)
    assert bool((outside <= picked.amin(-1, keepdim=True) + 2 * eps).all()), "a larger feature was left out"
    if plain is not None:
        kth = picked.amin(-1, keepdim=True)
        ours_only = ~torch.zeros_like(p, dtype=torch.bool).scatter(-1, plain[1], True).gather(-1, indices)
        assert bool(((picked - kth).abs() <= 2 * eps)[ours_only].all()), "differs from the fp32 path beyond a tie"


def check_bound(x, W, b):
    sw = S.prepare(W, b)
    xa, dx = S._augment(x, sw.n_terms)
    s, u_out = S._screen_gemm(xa, sw.w_aug)
    A, _ = S.row_bounds(x, dx, xa, sw)
    err = (s.double() - exact_pre(x, W, b)).abs()
    allowed = A[:, None] + u_out / (1 - u_out) * s.double().abs()
    assert bool((err <= allowed).all()), f"bound violated: worst ratio {float((err / allowed).max())}"
    return float((err / allowed).max())


def gaussian(n, d, width, seed=0, bias=0.1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen), torch.randn(width, d, generator=gen) / d**0.5,
            torch.randn(width, generator=gen) * bias)


# ------------------------------------------------------------------------------------------ bound
def test_bound_holds_and_is_nearly_tight_when_every_rounding_error_has_one_sign():
    # 1 + 0.49 * 2^-7 rounds down to 1 in bf16, by almost half a unit: every product errs the same way,
    # which is the case where Cauchy-Schwarz is an equality. The error must stay within the bound
    # and reach most of it (the constant is not loose).
    d, width = 512, 64
    x = torch.full((4, d), 1 + 0.49 * 2.0**-7)
    W = torch.full((width, d), 1 + 0.49 * 2.0**-7) / d
    b = torch.zeros(width)
    worst = check_bound(x, W, b)
    assert worst > 0.5, worst


@pytest.mark.parametrize("scale", [1e-36, 1e-30, 1.0, 1e15, 1e30])
def test_bound_holds_for_huge_and_tiny_norms(scale):
    x, W, b = gaussian(16, 256, 2048)
    check_bound(x * scale, W, b * scale)


def test_bound_holds_for_heavy_tailed_inputs_and_large_biases():
    x, W, b = gaussian(16, 256, 2048, bias=50.0)
    x[:, :3] *= 1e4  # massive-activation dimensions, as on a first token
    W[::7] *= 30  # a few features with large norms
    check_bound(x, W, b)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("k", [1, 32, 100])
def test_screened_equals_fp32_on_gaussian_rows(k):
    x, W, b = gaussian(40, 256, 4096)
    plain = topk_encode(x, W, b, k, screen="off")
    values, indices = topk_encode(x, W, b, k, screen="on", chunk_bytes=16 * 4096 * 4)
    assert_fp32_topk(x, W, b, values, indices, k, plain)


def test_many_near_ties_at_the_kth_value():
    # 300 features whose pre-activations differ by a few fp32 ulps around the k-th value: far more
    # candidates than the k slots, all inside the screen's bound of each other.
    x, W, b = gaussian(8, 256, 4096, seed=1)
    direction = x[0] / x[0].norm()
    W[:300] = direction * 2.5 + torch.randn(300, 256) * 1e-7
    values, indices = topk_encode(x, W, b, 50, screen="on")
    assert_fp32_topk(x, W, b, values, indices, 50, topk_encode(x, W, b, 50, screen="off"))


def test_exact_ties_and_rows_that_overflow_the_candidate_buffer():
    x, W, b = gaussian(6, 256, 4096, seed=2)
    W[:2000] = W[0]  # 2000 identical features: any row that ranks them high overflows cap = 1024
    b[:2000] = 5.0
    sw = S.prepare(W, b)
    _, _, ok = S.screened_chunk(x, W, b, 16, sw, cap=1024)
    assert not bool(ok.any()), "every row should overflow the buffer"
    values, indices = topk_encode(x, W, b, 16, screen="on")
    assert_fp32_topk(x, W, b, values, indices, 16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_take_the_plain_path(bad):
    x, W, b = gaussian(6, 256, 4096, seed=3)
    x[1, 5] = bad
    x[4] = bad
    ours = topk_encode(x, W, b, 20, screen="on")
    plain = topk_encode(x, W, b, 20, screen="off")
    for row in (1, 4):
        assert torch.equal(ours[0][row].nan_to_num(), plain[0][row].nan_to_num())
    finite = [0, 2, 3, 5]
    assert_fp32_topk(x[finite], W, b, ours[0][finite], ours[1][finite], 20)


def test_non_finite_weights_make_every_row_exact_through_the_plain_path():
    x, W, b = gaussian(6, 256, 4096, seed=4)
    W[7, 3] = float("inf")
    ours = topk_encode(x, W, b, 20, screen="on")
    plain = topk_encode(x, W, b, 20, screen="off")
    assert torch.equal(ours[0].nan_to_num(), plain[0].nan_to_num())


def test_huge_and_tiny_inputs_stay_exact():
    x, W, b = gaussian(12, 256, 4096, seed=5)
    x[:4] *= 1e-35  # near the bottom of the fp32 range: the absolute underflow terms matter
    x[4:8] *= 1e25
    b[:] = 0
    values, indices = topk_encode(x, W, b, 30, screen="on")
    assert_fp32_topk(x, W, b, values, indices, 30, topk_encode(x, W, b, 30, screen="off"))


def test_both_recompute_kernels_agree_with_fp64():
    # The CUDA branch (gathered rows, batched dot) runs here on CPU too, against the CPU branch.
    x, W, b = gaussian(30, 256, 4096, seed=8)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 30, (5000,), generator=gen).sort().values
    cols = torch.randint(0, 4096, (5000,), generator=gen)
    ref = (x.double()[rows] * W.double()[cols]).sum(-1)
    eps = fp32_error(x, W, torch.zeros_like(b))[rows]
    for sampled in (True, False):
        got = S.recompute(x, W, rows, cols, pairs_per_block=700, sampled=sampled)
        assert bool(((got.double() - ref).abs() <= eps).all())


# ------------------------------------------------------------------------------------------ routing
def test_prepared_weights_follow_in_place_updates():
    x, W, b = gaussian(20, 256, 4096, seed=6)
    first = topk_encode(x, W, b, 10, screen="on")
    W.neg_()
    b.neg_()
    again = topk_encode(x, W, b, 10, screen="on")
    assert_fp32_topk(x, W, b, *again, 10)
    assert not torch.equal(first[1], again[1])


def test_auto_choice_and_forced_errors():
    cpu = torch.device("cpu")
    assert not encode_screened(cpu, 2048, 32768, dtype=torch.bfloat16)
    assert not encode_screened(cpu, 64, 32768)  # d_model too small for a fast bf16 GEMM
    assert not encode_screened(cpu, 2048, 4096)  # too narrow
    assert not encode_screened(cpu, 2048, 32768, rows=4)
    assert encode_screened(cpu, 2048, 32768) == S.cpu_has_bf16_dot()
    x, W, b = gaussian(4, 64, 512)
    with pytest.raises(ValueError, match=r"screen='on' needs float32 weights \(got torch.bfloat16\)"):
        topk_encode(x, W.bfloat16(), b.bfloat16(), 4, screen="on")
    with pytest.raises(ValueError, match="screen must be 'auto', 'on' or 'off', got 'yes'"):
        topk_encode(x, W, b, 4, screen="yes")
    with pytest.raises(ValueError, match="no gradient"):
        topk_encode(x, W.requires_grad_(), b, 4, screen="on")


def test_sae_encode_sparse_screened_matches_unscreened():
    x, W, b = gaussian(32, 256, 8192, seed=7)
    sae = QwenScopeSAE.from_weights(W, W.T.contiguous(), b, torch.zeros(256), k=40)
    with torch.no_grad():
        sae.screen = "off"
        plain = sae.encode_sparse(x)
        sae.screen = "on"
        codes = sae.encode_sparse(x)
    pre = torch.addmm(b, x, W.T)
    relu_plain = pre.topk(40).indices, pre.topk(40).values
    assert_fp32_topk(x, W, b, pre.gather(-1, codes.indices), codes.indices, 40, (relu_plain[1], plain.indices))
    assert torch.allclose(codes.values, plain.values, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [50, 100])
@pytest.mark.parametrize(("d_model", "d_sae"), [(2048, 32768), (4096, 65536), (5120, 81920), (2048, 131072)])
def test_cuda_screened_exact_at_qwen_scope_shapes(d_model, d_sae, k):
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(512, d_model, device="cuda", generator=gen)
    W = torch.randn(d_sae, d_model, device="cuda", generator=gen) / d_model**0.5
    b = torch.randn(d_sae, device="cuda", generator=gen) * 0.1
    torch.backends.cuda.matmul.allow_tf32 = False
    assert encode_screened("cuda", d_model, d_sae)
    values, indices = topk_encode(x, W, b, k, screen="on")
    plain = topk_encode(x, W, b, k, screen="off", backend="torch")
    assert_fp32_topk(x.cpu(), W.cpu(), b.cpu(), values.cpu(), indices.cpu(), k, (plain[0].cpu(), plain[1].cpu()))
