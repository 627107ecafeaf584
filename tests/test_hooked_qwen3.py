"""Qwen3 and Qwen3-MoE in HookedTransformer / HookedSAETransformer against HF, offline.

Tolerances: fp32, 1e-4 on logits and on every layer's ``hook_resid_post`` (== HF decoder
layer n's output, taken with a forward hook).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings

import pytest
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformer, HookedTransformerConfig

from qscope_plugins.integrations import transformer_lens as tl_integration
from qscope_plugins.models._moe import RoutedMoE
from qscope_plugins.models.qwen3_moe import is_sparse_layer
from qscope_plugins.testing.tiny_models import (
    MAX_POSITIONS,
    hf_layer_outputs,
    save_checkpoint,
    tiny_model,
    tiny_tokenizer,
    tiny_topk_sae,
)

from _helpers import ATOL, assert_matches_hf, assert_steered_generation_matches_hf
from _helpers import HELLO_IDS as IDS

pytestmark = pytest.mark.usefixtures("no_network")
STEER_LAYER = 2
# name -> (architecture, config overrides, a hub id of that family for the hf_model= route)
VARIANTS = {
    "qwen3": ("Qwen3ForCausalLM", {}, "Qwen/Qwen3-8B-Base"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {}, "Qwen/Qwen3-30B-A3B-Base"),
    # decoder_sparse_step=2 makes layers 1 and 3 sparse; mlp_only_layers=[3] makes 3 dense again.
    "qwen3_moe_dense": ("Qwen3MoeForCausalLM", {"decoder_sparse_step": 2, "mlp_only_layers": [3]}, "Qwen/Qwen3-30B-A3B"),
}
LOADERS = ("from_pretrained_no_processing", "from_pretrained")
CLASSES = (HookedTransformer, HookedSAETransformer)


@pytest.fixture(scope="module", autouse=True)
def registered():
    return tl_integration.register()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """variant -> (HF model, its checkpoint directory)."""
    out = {}
    for name, (arch, overrides, _) in VARIANTS.items():
        model = tiny_model(arch, seed=3, **overrides)
        out[name] = (model, str(save_checkpoint(model, tmp_path_factory.mktemp(name))))
    return out


_LOADED: dict[tuple, HookedTransformer] = {}


def load(hf, variant: str, cls=HookedTransformer, loader: str = "from_pretrained_no_processing"):
    key = (variant, cls, loader)
    if key not in _LOADED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _LOADED[key] = getattr(cls, loader)(hf[variant][1], device="cpu")
    return _LOADED[key]


def test_register_is_idempotent():
    patched = HookedTransformer.from_pretrained
    first = tl_integration.register()
    assert tl_integration.register() == first
    assert HookedTransformer.from_pretrained == patched
    assert {"HookedTransformer:Qwen3ForCausalLM", "HookedTransformer:Qwen3MoeForCausalLM"} <= set(first)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_local_directory_matches_hf(hf, variant, loader, cls):
    model = load(hf, variant, cls, loader)
    assert type(model) is cls
    assert model.cfg.n_ctx == MAX_POSITIONS  # from the config, not TransformerLens's 2048
    assert_matches_hf(model, hf[variant][0], IDS, centered_logits=loader == "from_pretrained")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_model_needs_no_hub(hf, variant, cls, offline_hub):
    """A hub id that is not cached plus ``hf_model=``: config and weights come from the model."""
    hf_model = hf[variant][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained_no_processing(VARIANTS[variant][2], hf_model=hf_model, tokenizer=tiny_tokenizer(), device="cpu")
    assert model.cfg.original_architecture == VARIANTS[variant][0]
    assert_matches_hf(model, hf_model, IDS)
    assert model.to_string(model.to_tokens("héllo", prepend_bos=False)[0]) == "héllo"


@pytest.mark.parametrize("use_cache", (True, False), ids=("cache", "no_cache"))
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
def test_steered_generation_matches_hf(hf, variant, cls, use_cache):
    vector = 4 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert_steered_generation_matches_hf(load(hf, variant, cls), hf[variant][0], IDS, STEER_LAYER, vector,
                                         max_new_tokens=8, use_cache=use_cache)


def test_moe_routing_hooks_match_hf_router(hf):
    hf_model = hf["qwen3_moe"][0]
    routed = {}
    handles = [
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out, n=n: routed.__setitem__(n, out))
        for n, layer in enumerate(hf_model.model.layers)
    ]
    try:
        hf_layer_outputs(hf_model, IDS)
    finally:
        for handle in handles:
            handle.remove()
    _, cache = load(hf, "qwen3_moe").run_with_cache(IDS)
    for n, (logits, weights, indices) in routed.items():
        torch.testing.assert_close(cache[f"blocks.{n}.mlp.hook_router_logits"][0], logits, atol=ATOL, rtol=0)
        assert torch.equal(cache[f"blocks.{n}.mlp.hook_expert_indices"][0], indices)
        torch.testing.assert_close(cache[f"blocks.{n}.mlp.hook_expert_weights"][0], weights, atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{n}.mlp.hook_expert_weights"].sum(-1), torch.ones(1, IDS.shape[1]))


def test_zeroed_expert_weights_silence_the_moe_layer(hf):
    model = load(hf, "qwen3_moe")
    _, cache = model.run_with_cache(IDS, names_filter="blocks.1.hook_mlp_out")
    assert cache["blocks.1.hook_mlp_out"].abs().max() > 0
    with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_expert_weights", lambda w, hook: torch.zeros_like(w))]):
        _, cache = model.run_with_cache(IDS, names_filter="blocks.1.hook_mlp_out")
    assert torch.equal(cache["blocks.1.hook_mlp_out"], torch.zeros_like(cache["blocks.1.hook_mlp_out"]))


def test_dense_layers_follow_hf_config(hf):
    hf_model, directory = hf["qwen3_moe_dense"]
    model = load(hf, "qwen3_moe_dense")
    expected = [is_sparse_layer(model.cfg.hf_text_config, n) for n in range(4)]
    assert expected == [False, True, False, False]
    assert [isinstance(block.mlp, RoutedMoE) for block in model.blocks] == expected
    assert [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf_model.model.layers] == expected
    # fold_ln cannot fold a dense layer's norm in an MoE config: loaded unfolded, with a warning.
    with pytest.warns(UserWarning, match="fold_ln is not supported"):
        processed = HookedTransformer.from_pretrained(directory, device="cpu")
    assert processed.cfg.normalization_type == "RMS"


def test_loading_options_apply(hf):
    hf_model, directory = hf["qwen3_moe"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer.from_pretrained_no_processing(directory, device="cpu", first_n_layers=2, n_ctx=64)
    assert (model.cfg.n_layers, model.cfg.n_ctx, len(model.blocks)) == (2, 64, 2)
    _, ref_layers = hf_layer_outputs(hf_model, IDS)
    _, cache = model.run_with_cache(IDS)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], ref_layers[1], atol=ATOL, rtol=0)


def test_training_checkpoints_are_refused(hf):
    directory = hf["qwen3"][1]
    with pytest.raises(ValueError, match=f"^{directory} has no training checkpoints to load$"):
        HookedTransformer.from_pretrained(directory, checkpoint_index=0)


def test_other_model_names_keep_transformer_lens_error():
    with pytest.raises(ValueError, match="not-a-real-model not found. Valid official model names"):
        HookedTransformer.from_pretrained("not-a-real-model")


def test_sae_reads_the_hf_layer_output_after_default_processing(hf, recwarn):
    hf_model = hf["qwen3"][0]
    model = load(hf, "qwen3", HookedSAETransformer, "from_pretrained")
    hook = f"blocks.{STEER_LAYER}.hook_resid_post"
    model.add_sae(tiny_topk_sae(64, hook, center_writing_weights=False), use_error_term=True)
    try:
        assert not [w for w in recwarn if "residual stream" in str(w.message)]
        assert tl_integration.residual_stream_changes(model) == []
        _, ref_layers = hf_layer_outputs(hf_model, IDS)
        logits, cache = model.run_with_cache(IDS)
        torch.testing.assert_close(cache[f"{hook}.hook_sae_input"], ref_layers[STEER_LAYER], atol=ATOL, rtol=0)
        assert cache[f"{hook}.hook_sae_acts_post"].count_nonzero(-1).max() == 8
    finally:
        model.reset_saes()


def test_sae_warning_when_processing_changed_the_residual_stream():
    """A LayerNorm model with centred writing weights has a different residual stream."""
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, n_ctx=8, d_vocab=20, act_fn="gelu", normalization_type="LN")
    model = HookedSAETransformer(cfg)
    model.load_and_process_state_dict(model.state_dict(), fold_ln=True, center_writing_weights=True)
    assert tl_integration.residual_stream_changes(model) == ["center_writing_weights"]
    with pytest.warns(UserWarning, match="expects a model loaded without center_writing_weights"):
        model.add_sae(tiny_topk_sae(16, "blocks.0.hook_resid_post", center_writing_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.add_sae(tiny_topk_sae(16, "blocks.0.hook_resid_post"))  # trained on the default, centred model


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_dense"])
def test_bfloat16_moe(hf, variant):
    """Router and experts follow the model's dtype (TransformerLens builds experts in the default dtype)."""
    model = HookedTransformer.from_pretrained_no_processing(hf[variant][1], device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        logits = model(ids)
        ref = hf[variant][0].to(torch.bfloat16)(ids).logits
        hf[variant][0].float()
    assert logits.dtype == torch.bfloat16
    assert float((logits.float() - ref.float()).abs().mean()) < 0.05
