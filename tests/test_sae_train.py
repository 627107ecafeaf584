"""Training a Top-k SAE with SAELens's runner on a tiny Qwen3 and exporting it in the Qwen-Scope layout."""

from __future__ import annotations

import json

import pytest
import torch

from qscope_plugins import load_sae
from qscope_plugins.recipes import sae_train
from qscope_plugins.recipes.sae_train import NormFilter, drop_extreme_norms, released_state, training_config
from qscope_plugins.sae import QwenScopeSAE
from qscope_plugins.sae.format import read_layer_file
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model, tiny_tokenizer

TEXTS = [f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(100)]
LAYER, D_SAE, K, STEPS, BATCH = 1, 1024, 8, 40, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_model("Qwen3ForCausalLM", seed=3), tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="module")
def trained(checkpoint, tmp_path_factory):
    cfg = training_config(
        str(checkpoint), LAYER, d_in=64, d_sae=D_SAE, k=K, training_tokens=STEPS * BATCH, context_size=32,
        train_batch_size_tokens=BATCH, store_batch_size_prompts=8, n_batches_in_buffer=4, lr=3e-3,
        dead_feature_window=10, feature_sampling_window=20, n_eval_batches=1, seed=0,
    )
    out = tmp_path_factory.mktemp("export") / f"SAE-Res-Tiny-W1K-L0_{K}"
    return sae_train.train_sae(cfg, TEXTS, out_dir=out)


def test_config_uses_saelens_topk_with_aux_loss_and_first_token_slice(checkpoint):
    cfg = training_config(str(checkpoint), 2, d_in=64, d_sae=128, k=4, training_tokens=1000)
    assert cfg.sae.architecture() == "topk" and cfg.sae.aux_loss_coefficient == 1 / 32
    assert cfg.hook_name == "blocks.2.hook_resid_post" and cfg.seqpos_slice == (1, None)
    assert cfg.prepend_bos is False and cfg.sae.apply_b_dec_to_input is False
    assert training_config(str(checkpoint), 2, d_in=64, d_sae=128, k=4, training_tokens=1000,
                           skip_first_token=False).seqpos_slice == (None,)


def test_norm_filter_drops_exactly_the_planted_extreme_rows():
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(100, 16, generator=gen)
    planted = [3, 50, 97]
    acts[planted] *= 40.0
    kept = drop_extreme_norms(acts, 10.0)
    assert kept.shape[0] == 97
    assert torch.equal(kept, acts[[i for i in range(100) if i not in planted]])

    class Store:
        def get_filtered_llm_batch(self, raise_on_epoch_end=False):
            return acts

    store = Store()
    norm_filter = NormFilter(store, 10.0)
    assert store.get_filtered_llm_batch(raise_on_epoch_end=True).shape[0] == 97
    assert (norm_filter.kept, norm_filter.dropped) == (97, 3)
    with pytest.raises(ValueError, match="the norm filter factor must be > 1"):
        NormFilter(Store(), 0.5)


def test_export_folds_decoder_norm_rescaling_and_b_dec_presubtraction():
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=64, k=5, apply_b_dec_to_input=True,
                                                rescale_acts_by_decoder_norm=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
        sae.W_dec.mul_(torch.rand(64, 1, generator=gen) * 3 + 0.1)  # decoder rows far from unit norm
    state = released_state(sae)
    exported = QwenScopeSAE.from_weights(**state, k=5)
    x = torch.randn(20, 16, generator=gen)
    torch.testing.assert_close(exported.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported(x), sae(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_sae_that_is_not_topk():
    from sae_lens import StandardSAE, StandardSAEConfig

    with pytest.raises(ValueError, match="only Top-k SAEs fit the Qwen-Scope format; this one is 'standard'"):
        released_state(StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)))


def test_training_runs_saelens_with_filter_and_learns(trained):
    sae = trained.sae
    assert type(sae).__name__ == "TopKTrainingSAE" and sae.cfg.aux_loss_coefficient == 1 / 32
    assert trained.norm_filter.kept > STEPS * BATCH  # every training token passed through the filter
    assert sae.cfg.metadata.seqpos_slice == (1, None)
    from qscope_plugins.backends.hf import HFBackend
    from qscope_plugins.recipes.sae_eval import evaluate_sae
    from transformers import AutoModelForCausalLM

    backend = HFBackend(AutoModelForCausalLM.from_pretrained(sae.cfg.metadata.model_name), tiny_tokenizer())
    loaded = load_sae(trained.out_dir, LAYER)  # k from the Qwen-Scope-style directory name
    result = evaluate_sae(backend, {LAYER: loaded}, TEXTS[:8], skip_first_token=True, compute_loss=False)[LAYER]
    assert result.explained_variance > 0.2 and result.l0 == K  # 40 steps from a 0.1-norm init learn


def test_export_round_trips_through_load_sae_and_saelens(trained):
    from sae_lens import SAE

    from qscope_plugins import register

    register()
    out = trained.out_dir
    sidecar = json.loads((out / f"layer{LAYER}" / "cfg.json").read_text())
    assert sidecar["qscope"]["k"] == K and sidecar["qscope"]["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    file_state = read_layer_file(out / f"layer{LAYER}.sae.pt")
    for key, value in released_state(trained.sae).items():
        assert torch.equal(file_state[key], value)
    x = 3 * torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    expected = trained.sae(x)
    for sae in (load_sae(out, LAYER), load_sae(out / f"layer{LAYER}", LAYER), SAE.load_from_disk(out / f"layer{LAYER}")):
        assert sae.cfg.k == K
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(sae.encode(x) != 0, trained.sae.encode(x) != 0)
