"""One ``b_dec`` / scale fold for both trainers (issue 18 item 4): ``sae.format.released_layout``."""

import torch

from qscope_plugins.demo.sae_train import SAEConfig, encode, reconstruct, train_nano_sae
from qscope_plugins.recipes.sae_train import released_state
from qscope_plugins.sae.metrics import explained_variance
from qscope_plugins.sae.training import AuxKTrainingSAE, AuxKTrainingSAEConfig


def test_the_fold_is_bit_identical_to_the_nano_trainers_own_export():
    """The nano trainer exported ``(b_enc - W_enc @ b_dec) * scale`` from its own (d_sae, d_model) rows;
    the shared fold, given its SAELens training SAE, gives the same bits and strides."""
    gen = torch.Generator().manual_seed(4)
    sae = AuxKTrainingSAE(AuxKTrainingSAEConfig(d_in=16, d_sae=64, k=4))
    sae.initialise_at(torch.randn(64, 16, generator=gen), torch.randn(16, generator=gen))
    with torch.no_grad():
        sae.b_enc.normal_(generator=gen)
    scale = 1.7
    rows = sae.W_enc.T
    old = {"W_enc": rows.detach().clone(), "W_dec": sae.W_dec.T.detach().clone(),
           "b_enc": ((sae.b_enc - rows @ sae.b_dec) * scale).detach().clone(),
           "b_dec": (sae.b_dec * scale).detach().clone()}
    new = released_state(sae, scale=scale)
    for key in old:
        assert torch.equal(new[key], old[key]) and new[key].stride() == old[key].stride(), key
        assert new[key].data_ptr() != getattr(sae, key).data_ptr()  # copies, not the parameters


def test_nano_export_computes_the_released_formula_on_raw_inputs():
    acts = torch.randn(1200, 16, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    cfg = SAEConfig(expansion=4, k=4, batch_size=200, epochs=1, dead_after_tokens=400, seed=1)
    state = train_nano_sae(acts, cfg)
    assert {key: tuple(v.shape) for key, v in state.items()} == {
        "W_enc": (64, 16), "W_dec": (16, 64), "b_enc": (64,), "b_dec": (16,)}
    x_hat = reconstruct(state, acts, cfg.k)
    torch.testing.assert_close(x_hat, encode(state, acts, cfg.k) @ state["W_dec"].T + state["b_dec"])
    ev = explained_variance(acts, x_hat)
    assert ev == 1.0 - float((acts - x_hat).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    assert 0.0 < ev < 1.0
