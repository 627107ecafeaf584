"""TransformerLens's model-agnostic behaviours on the four architectures, checked the way its own tests do.

Each variant is a tiny random-weight fp32 model (``qscope_plugins.testing.tiny_models``) loaded with
``HookedTransformer.from_pretrained_no_processing`` from a local checkpoint; HF is the reference
(loss, logits, decoder-layer outputs taken with forward hooks). What differs from TransformerLens's
own models is asserted as the exact behaviour documented in docs/models.md ("What TransformerLens
utilities do on each architecture").
"""

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer

import qscope_plugins
from qscope_plugins.testing.tiny_models import hf_layer_outputs, save_checkpoint, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VARIANTS = {
    "qwen3": ("Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {}),
    "qwen3_moe_dense": ("Qwen3MoeForCausalLM", {"decoder_sparse_step": 2, "mlp_only_layers": [3]}),
    "qwen3_5": ("Qwen3_5ForCausalLM", {}),
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM", {}),
}
FOLDS = {"qwen3": True, "qwen3_moe": True, "qwen3_moe_dense": False, "qwen3_5": False, "qwen3_5_moe": False}
LINEAR_ATTENTION = {"qwen3_5", "qwen3_5_moe"}  # layers 0 and 2 are Gated DeltaNet, 1 and 3 full attention
T = 7  # sequence length: a size no other axis of these tiny models has
IDS = torch.randint(1, 300, (2, T), generator=torch.Generator().manual_seed(0))
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def registered():
    qscope_plugins.register()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(variant, tmp_path_factory):
    arch, overrides = VARIANTS[variant]
    hf = tiny_model(arch, **overrides)
    return hf, save_checkpoint(hf, tmp_path_factory.mktemp(variant) / "model")


def load(checkpoint, **kwargs):
    return HookedTransformer.from_pretrained_no_processing(str(checkpoint[1]), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    hf = checkpoint[0]
    with torch.no_grad():
        logits, layers = hf_layer_outputs(hf, IDS)
        return {"logits": logits, "layers": layers, "loss": float(hf(IDS, labels=IDS).loss)}


@pytest.fixture(scope="module")
def cache(model):
    with torch.no_grad():
        return model.run_with_cache(IDS)[1]


# ---------------------------------------------------------------- loss, layers, weight processing

def test_loss_and_stop_start_at_layer_match_hf(model, reference):
    with torch.no_grad():
        assert float(model(IDS, return_type="loss")) == pytest.approx(reference["loss"], abs=1e-5)
        resid = model(IDS, stop_at_layer=2)  # the input of block 2 = output of HF layer 1
        torch.testing.assert_close(resid, reference["layers"][1], atol=ATOL, rtol=0)
        torch.testing.assert_close(model(resid, start_at_layer=2), reference["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("route", ["process_weights_", "load_and_process_state_dict"])
def test_every_weight_processing_route_keeps_the_model(checkpoint, reference, variant, route):
    """fold_ln where the blocks allow it, else skipped with the from_pretrained warning; loss and log-probs as HF."""
    model = load(checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if route == "process_weights_":
            model.process_weights_()
        else:
            model.load_and_process_state_dict(model.state_dict(), fold_ln=True)
    messages = [str(w.message) for w in caught if "fold_ln" in str(w.message)]
    if FOLDS[variant]:
        assert messages == [] and model.cfg.normalization_type == "RMSPre"
    else:
        arch = VARIANTS[variant][0]
        assert messages == [f"fold_ln is not supported for {arch} blocks; processing with fold_ln=False "
                            "(the residual stream is the same either way)"]
        assert model.cfg.normalization_type == "RMS"
    with torch.no_grad():
        logits, cache = model.run_with_cache(IDS)
        assert float(model(IDS, return_type="loss")) == pytest.approx(reference["loss"], abs=1e-5)
    torch.testing.assert_close(logits.log_softmax(-1), reference["logits"].log_softmax(-1), atol=ATOL, rtol=0)
    for n, layer in enumerate(reference["layers"]):
        torch.testing.assert_close(cache[f"blocks.{n}.hook_resid_post"], layer, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_moves(checkpoint, reference, dtype):
    moved = load(checkpoint).to(dtype)
    assert moved.cfg.dtype == dtype and all(p.dtype == dtype for p in moved.parameters())
    with torch.no_grad():
        logits = moved(IDS)
    assert logits.dtype == dtype
    tol = 1e-4 if dtype == torch.float64 else 1.0  # bf16: 8 bits of mantissa through 4 layers
    torch.testing.assert_close(logits.float(), reference["logits"], atol=tol, rtol=0)


# ---------------------------------------------------------------- ActivationCache utilities

def position_axis(tensor):
    """The first axis after batch whose size is the sequence length (the destination axis of a pattern)."""
    return next(axis for axis in range(1, tensor.ndim) if tensor.shape[axis] == T)


def token_rows(name):
    """Hooks that hold one row per routed token or per (token, head), with no batch or position axis:
    per-expert hooks, and the per-head q/k norms (TransformerLens's own layout for Qwen3)."""
    return ".experts." in name or ".q_norm." in name or ".k_norm." in name


def test_cache_slicing_cuts_positions_on_every_hook(model, cache):
    """run_with_cache(pos_slice=...), apply_slice_to_batch_dim and remove_batch_dim on every hook, 4-D ones included."""
    with torch.no_grad():
        _, last = model.run_with_cache(IDS, pos_slice=-1)
    batched = [name for name in cache.keys() if not token_rows(name)]
    for name in batched:
        full = cache[name]
        assert full.shape[0] == 2, name
        # TransformerLens's own rule cuts hook_rot_q / hook_rot_k ([batch, pos, head, d_head]) on the
        # head axis, for its own rotary models too; every hook this project adds is cut on positions.
        axis = -2 if name.endswith(("hook_rot_q", "hook_rot_k")) else position_axis(full)
        torch.testing.assert_close(last[name], full.narrow(axis, full.shape[axis] - 1, 1), msg=name)
    for name in cache.keys():
        if ".q_norm." in name or ".k_norm." in name:
            assert cache[name].shape[0] in (2 * T * model.cfg.n_heads, 2 * T * model.cfg.n_key_value_heads), name
    second = cache.apply_slice_to_batch_dim(1)
    for name in batched:
        torch.testing.assert_close(second[name], cache[name][1], msg=name)
    with torch.no_grad():
        _, single = model.run_with_cache(IDS[:1])
    unbatched = single.remove_batch_dim()
    for name in ("blocks.0.attn.hook_gate", "blocks.1.attn.hook_gate", "blocks.0.attn.hook_recurrent_out"):
        if name in cache:
            assert unbatched[name].shape == cache[name].shape[1:] and cache[name].ndim == 3, name


def test_residual_decompositions(model, cache, reference):
    final = cache["blocks.3.hook_resid_post"]
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels[-1] == "final_post" and len(labels) == 2 * 4 + 1
    torch.testing.assert_close(stack[-1], final)
    decomposed, labels = cache.decompose_resid(apply_ln=False, return_labels=True)
    assert labels == ["embed", *[f"{n}_{part}" for n in range(4) for part in ("attn_out", "mlp_out")]]
    torch.testing.assert_close(decomposed.sum(0), final, atol=ATOL, rtol=0)
    # apply_ln divides by the cached final-norm scale (the gain is in W_U once folded)
    scaled = cache.apply_ln_to_stack(final[None], layer=-1)[0]
    torch.testing.assert_close(scaled, final / cache["ln_final.hook_scale"])
    # logit attributions: each component, scaled by the final norm, dotted with the token's W_U column
    # (without the final norm's gain unless fold_ln moved it into W_U: not possible for Qwen3.5)
    attrs = cache.logit_attrs(decomposed, tokens=IDS[0, 1])
    torch.testing.assert_close(attrs, (decomposed / cache["ln_final.hook_scale"]) @ model.W_U[:, IDS[0, 1]],
                               atol=ATOL, rtol=0)


def test_per_head_utilities(model, cache, variant):
    """stack_head_results / get_full_resid_decomposition / stack_activation("pattern"): every layer of
    Qwen3 / Qwen3-MoE; on Qwen3.5 the Gated DeltaNet layers have no attention heads (no hook_z, no pattern)."""
    if variant in LINEAR_ATTENTION:
        with pytest.raises(KeyError, match="blocks.0.attn.hook_z"):
            cache.stack_head_results(layer=-1)
        with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
            cache.stack_activation("pattern")
        assert "blocks.1.attn.hook_pattern" in cache and "blocks.0.attn.hook_pattern" not in cache
        return
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert heads.shape == (4 * model.cfg.n_heads, 2, T, model.cfg.d_model) and labels[0] == "L0H0"
    torch.testing.assert_close(heads.sum(0) + model.b_O.sum(0), sum(cache[f"blocks.{n}.hook_attn_out"] for n in range(4)),
                               atol=ATOL, rtol=0)
    assert cache.stack_activation("pattern").shape == (4, 2, model.cfg.n_heads, T, T)


# ---------------------------------------------------------------- tokens, padding, generation

def test_tokenization_helpers(model):
    tokens = model.to_tokens("hello", prepend_bos=False)
    assert model.to_string(tokens[0]) == "hello" and model.to_str_tokens("hello", prepend_bos=False) == list("hello")
    assert model.cfg.default_prepend_bos is False  # Qwen: no BOS (TransformerLens would prepend <|endoftext|>)
    assert model.to_tokens("hello")[0, 0] == tokens[0, 0]
    assert model.get_token_position("l", "hello", prepend_bos=False) == 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_the_unpadded_prompt(model, side):
    prompts = ["hi", "hello there"]
    with torch.no_grad():
        batch = model.to_tokens(prompts, padding_side=side, prepend_bos=False)
        logits = model(batch, padding_side=side, prepend_bos=False)
        alone = model(model.to_tokens("hi", prepend_bos=False))
    short = logits[0, -2:] if side == "left" else logits[0, :2]
    torch.testing.assert_close(short, alone[0], atol=ATOL, rtol=0)


def test_mask_hole_is_treated_as_hf_treats_it(checkpoint, model):
    """A 0 inside the attention mask: TransformerLens numbers positions by the mask (every model); full
    attention skips that key, a Gated DeltaNet layer zeroes that input but its state carries the tokens
    before it past the hole. With the same position ids HF computes the same, masked position included."""
    hf = checkpoint[0]
    mask = torch.ones_like(IDS)
    mask[:, 3] = 0
    with torch.no_grad():
        expected = hf(IDS, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        logits = model(IDS, attention_mask=mask)
        unmasked = model(IDS)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(logits[:, 4:], unmasked[:, 4:], atol=1e-3)  # the hole changed what follows


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_greedy_generation_matches_hf(checkpoint, model, use_past_kv_cache):
    hf = checkpoint[0]
    with torch.no_grad():
        expected = hf.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False, use_past_kv_cache=use_past_kv_cache,
                         stop_at_eos=False, verbose=False)
    assert out.tolist() == expected.tolist()
