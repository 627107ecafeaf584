"""The SAE math: parity with SAELens, Top-k properties, sparse == dense, dtypes, chunking."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from qscope_plugins import QwenScopeSAE
from qscope_plugins.testing.sae_files import random_sae_state

D_MODEL, D_SAE, K = 64, 512, 16


@pytest.fixture(scope="module")
def state():
    return random_sae_state(D_MODEL, D_SAE, seed=1)


@pytest.fixture(scope="module")
def sae(state):
    return QwenScopeSAE.from_weights(**state, k=K, layer=3)


def saelens_reference(state) -> TopKSAE:
    ref = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K, apply_b_dec_to_input=False))
    ref.load_state_dict({"W_enc": state["W_enc"].T, "W_dec": state["W_dec"].T,
                         "b_enc": state["b_enc"], "b_dec": state["b_dec"]})
    return ref


def test_is_a_saelens_sae_with_hook_metadata(sae):
    assert isinstance(sae, SAE) and isinstance(sae, TopKSAE)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.layer == 3 and sae.cfg.architecture() == "qwen_scope_topk"
    assert not sae.cfg.apply_b_dec_to_input


@torch.no_grad()
def test_parity_with_saelens_topk(sae, state):
    ref = saelens_reference(state)
    x = 3 * torch.randn(4, 7, D_MODEL)
    torch.testing.assert_close(sae.encode(x), ref.encode(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), ref(x), atol=1e-5, rtol=0)
    codes = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(*codes), ref.decode(ref.encode(x)), atol=1e-5, rtol=0)


@torch.no_grad()
def test_formula_by_hand(sae, state):
    x = torch.randn(5, D_MODEL)
    pre = x @ state["W_enc"].T + state["b_enc"]  # no b_dec pre-subtraction
    torch.testing.assert_close(sae.encode_pre(x), pre)
    top = pre.topk(K, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ state["W_dec"].T + state["b_dec"])


@torch.no_grad()
def test_exactly_k_nonzeros_when_enough_positive(sae):
    x = 5 * torch.randn(32, D_MODEL)
    pre = sae.encode_pre(x)
    enough = (pre > 0).sum(-1) >= K
    assert enough.all()
    assert ((sae.encode(x) != 0).sum(-1) == K).all()
    codes = sae.encode_sparse(x)
    assert codes.values.shape == codes.indices.shape == (32, K)
    assert (codes.values > 0).all()
    assert (codes.values[:, :-1] >= codes.values[:, 1:]).all(), "sorted descending"


@torch.no_grad()
def test_relu_false_keeps_negative_topk_values(state):
    shifted = dict(state, b_enc=state["b_enc"] - 100.0)  # every pre-activation negative
    card = QwenScopeSAE.from_weights(**shifted, k=K, relu=False)
    paper = QwenScopeSAE.from_weights(**shifted, k=K)
    x = torch.randn(3, D_MODEL)
    assert (card.encode_sparse(x).values < 0).all()
    assert ((card.encode(x) != 0).sum(-1) == K).all()
    assert (paper.encode(x) == 0).all() and (paper.encode_sparse(x).values == 0).all()


@torch.no_grad()
def test_planted_sparse_codes_are_recovered(sae):
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        planted = torch.randperm(D_SAE, generator=gen)[:4]
        x = (2 + torch.rand(4, generator=gen)) @ sae.directions(planted) + sae.b_dec
        codes = sae.encode_sparse(x)
        assert set(codes.indices[:4].tolist()) == set(planted.tolist())


@torch.no_grad()
def test_chunking_does_not_change_results(state):
    sae = QwenScopeSAE.from_weights(**state, k=K)
    x = torch.randn(2, 37, D_MODEL)
    whole = sae.encode_sparse(x)
    sae.chunk_bytes = 5 * D_SAE * 4  # five rows of pre-activations at a time
    chunked = sae.encode_sparse(x)
    torch.testing.assert_close(chunked.values, whole.values)
    assert torch.equal(chunked.indices, whole.indices)
    torch.testing.assert_close(sae.decode_sparse(*chunked), sae.decode(sae.encode(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision(dtype):
    wide = random_sae_state(256, D_SAE, seed=1)  # wide enough that planted features barely interfere
    fp32 = QwenScopeSAE.from_weights(**wide, k=8)
    low = QwenScopeSAE.from_weights(**{k: v.to(dtype) for k, v in wide.items()}, k=8)
    assert low.W_enc.dtype == dtype and low.cfg.dtype in ("bfloat16", "float16")
    # Inputs with clear winners (planted features), as a trained SAE sees: random inputs to a
    # random SAE are full of near-ties that half precision legitimately reorders.
    gen = torch.Generator().manual_seed(3)
    planted = torch.stack([torch.randperm(D_SAE, generator=gen)[:8] for _ in range(32)])
    x = torch.einsum("nk,nkd->nd", 2 + torch.rand(32, 8, generator=gen), fp32.W_dec.detach()[planted]) + fp32.b_dec
    codes = low.encode_sparse(x)
    assert codes.values.dtype == dtype and codes.indices.dtype == torch.long
    out = low.decode_sparse(*codes)
    assert out.dtype == dtype
    ref = fp32.reconstruct(x)
    assert float((out.float() - ref).norm() / ref.norm()) < 0.02
    assert torch.equal(codes.indices.sort(-1).values, fp32.encode_sparse(x).indices.sort(-1).values)
    dense = low.decode(low.encode(x))
    assert float((dense.float() - ref).norm() / ref.norm()) < 0.02


def test_directions_are_raw_decoder_columns(sae, state):
    torch.testing.assert_close(sae.direction(5), state["W_dec"][:, 5])
    torch.testing.assert_close(sae.directions([1, 9]), state["W_dec"][:, [1, 9]].T)
    with pytest.raises(ValueError, match=r"feature id 512 out of range \[0, 512\) for this SAE"):
        sae.direction(D_SAE)
    with pytest.raises(ValueError, match=r"feature id -1 out of range"):
        sae.directions([0, -1])


def test_bad_inputs(sae, state):
    with pytest.raises(ValueError, match="input last dimension 63 != SAE d_in 64"):
        sae.encode_sparse(torch.randn(2, 63))
    with pytest.raises(ValueError, match="k=600 exceeds d_sae=512"):
        QwenScopeSAE.from_weights(**state, k=600)
    codes = sae.encode_sparse(torch.randn(2, D_MODEL))
    with pytest.raises(ValueError, match="must have one shape"):
        sae.decode_sparse(codes.values, codes.indices[:, :3])


OPTIONS = [dict(apply_b_dec_to_input=b, rescale_acts_by_decoder_norm=r) for b in (False, True) for r in (False, True)]


@pytest.mark.parametrize("when", ["construction", "after"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"b_dec_in={o['apply_b_dec_to_input']}-rescale={o['rescale_acts_by_decoder_norm']}")
@torch.no_grad()
def test_saelens_topk_options_mean_the_same_on_every_path(state, options, when):
    """``apply_b_dec_to_input`` / ``rescale_acts_by_decoder_norm``: dense, sparse and folded paths all equal SAELens's TopKSAE."""
    rows = {**state, "W_dec": state["W_dec"] * torch.linspace(0.5, 2.0, D_SAE)}  # decoder rows of unequal norm
    ref = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K, **options))
    ref.load_state_dict({"W_enc": rows["W_enc"].T, "W_dec": rows["W_dec"].T, "b_enc": rows["b_enc"], "b_dec": rows["b_dec"]})
    sae = QwenScopeSAE.from_weights(**rows, k=K, layer=3)
    if when == "construction":
        cfg = sae.cfg
        for key, value in options.items():
            setattr(cfg, key, value)
        sae = QwenScopeSAE.from_parts(cfg, sae.W_enc.T, sae.W_dec, sae.b_enc, sae.b_dec)
    else:
        for key, value in options.items():
            setattr(sae.cfg, key, value)
    x = 3 * torch.randn(4, 7, D_MODEL, generator=torch.Generator().manual_seed(0))
    expected_codes, expected_out = ref.encode(x), ref(x)
    torch.testing.assert_close(sae.encode(x), expected_codes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(x), expected_out, atol=1e-4, rtol=1e-4)
    values, indices = sae.encode_sparse(x)
    dense = torch.zeros_like(expected_codes).scatter_(-1, indices, values)
    torch.testing.assert_close(dense, expected_codes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.reconstruct(x), expected_out, atol=1e-4, rtol=1e-4)
    if options["rescale_acts_by_decoder_norm"]:  # SAELens folds only when rescaling (else Top-k could change)
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(x), expected_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae.reconstruct(x), expected_out, atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(NotImplementedError, match="rescale_acts_by_decoder_norm is False"):
            sae.fold_W_dec_norm()


def test_input_normalisation_is_refused_with_its_reason(sae):
    cfg = sae.cfg
    cfg_dict = {**cfg.to_dict(), "normalize_activations": "layer_norm"}
    with pytest.raises(ValueError, match=r"normalize_activations='layer_norm' is not supported: Qwen-Scope SAEs read raw"):
        QwenScopeSAE(type(cfg).from_dict(cfg_dict))
