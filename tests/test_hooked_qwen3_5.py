"""Qwen3.5 and Qwen3.5-MoE in HookedTransformer / HookedSAETransformer, against HF in fp32.

Tiny random models (hidden 64, linear + full attention layers, 4 experts + shared expert, every
weight perturbed) from :mod:`qscope_plugins.testing.tiny_models`. "HF layer n" is the output of
``model.model.layers[n]``, captured with a forward hook.
"""

import warnings

import pytest
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

import qscope_plugins
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import hf_layer_outputs, save_checkpoint, tiny_model, tiny_tokenizer

from _helpers import ATOL, assert_matches_hf, assert_steered_generation_matches_hf

ARCHS = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
NAMES = {"Qwen3_5ForCausalLM": "Qwen/Qwen3.5-2B-Base", "Qwen3_5MoeForCausalLM": "Qwen/Qwen3.5-35B-A3B-Base"}
STEER_LAYER = 1  # a middle layer (of 4), full attention; layer 0 and 2 are linear attention

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def hf(arch):
    return tiny_model(arch)


@pytest.fixture(scope="module")
def checkpoints(arch, hf, tmp_path_factory):
    """(text-only directory, published multimodal layout) of ``hf``."""
    root = tmp_path_factory.mktemp(arch)
    return save_checkpoint(hf, root / "text"), save_checkpoint(hf, root / "multimodal", multimodal=True)


@pytest.fixture(scope="module")
def hooked(checkpoints):
    return HookedTransformer.from_pretrained_no_processing(str(checkpoints[0]), device="cpu")


def prompt(batch=2, length=13, seed=0):
    # Ids from 1: id 0 is the tiny tokenizer's pad token, which TransformerLens would mask.
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_and_every_resid_post_match_hf(hooked, hf):
    assert [type(block.attn).__name__ for block in hooked.blocks] == [
        "GatedDeltaNet", "OutputGatedAttention", "GatedDeltaNet", "OutputGatedAttention"]
    assert hooked.cfg.n_ctx == hf.config.max_position_embeddings
    assert hooked.cfg.rotary_dim == hf.config.head_dim // 4
    assert_matches_hf(hooked, hf, prompt())


def test_hook_points_and_what_they_carry(hooked, arch):
    ids = prompt(batch=1, length=9)
    _, cache = hooked.run_with_cache(ids)
    linear, full = "blocks.0.attn.", "blocks.1.attn."
    assert cache[linear + "hook_q"].shape == (1, 9, 2, 16) and cache[linear + "hook_v"].shape == (1, 9, 4, 16)
    assert cache[linear + "hook_beta"].shape == cache[linear + "hook_g"].shape == (1, 9, 4)
    assert cache[linear + "hook_gate"].shape == cache[linear + "hook_recurrent_out"].shape == (1, 9, 4 * 16)
    beta, g = cache[linear + "hook_beta"], cache[linear + "hook_g"]
    assert bool((g < 0).all()) and bool(((beta > 0) & (beta < 1)).all())
    pattern = cache[full + "hook_pattern"]
    assert pattern.shape == (1, 4, 9, 9)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, 9))
    assert float(pattern.triu(1).abs().max()) == 0.0
    standard = ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out", "ln1.hook_normalized", "ln2.hook_scale")
    assert all(f"blocks.{n}.{name}" in cache for n in range(4) for name in standard)
    if arch == "Qwen3_5MoeForCausalLM":
        assert cache["blocks.2.mlp.hook_expert_indices"].shape == (1, 9, 2)
        assert cache["blocks.2.mlp.hook_shared_gate"].shape == (1, 9, 1)


def test_hooks_edit_the_computation(hooked):
    ids = prompt(batch=1, length=9)
    # No writes to the delta-rule state (beta = 0): the linear layer's recurrent output is zero.
    with hooked.hooks(fwd_hooks=[("blocks.0.attn.hook_beta", lambda beta, hook: torch.zeros_like(beta))]):
        _, cache = hooked.run_with_cache(ids, names_filter="blocks.0.attn.hook_recurrent_out")
    assert float(cache["blocks.0.attn.hook_recurrent_out"].abs().max()) == 0.0
    # A closed output gate silences the full-attention layer.
    with hooked.hooks(fwd_hooks=[("blocks.1.attn.hook_gate", lambda gate, hook: torch.full_like(gate, -torch.inf))]):
        _, cache = hooked.run_with_cache(ids, names_filter="blocks.1.hook_attn_out")
    assert float(cache["blocks.1.hook_attn_out"].abs().max()) == 0.0


def test_per_head_input_hooks_are_refused(hooked):
    hooked.set_use_split_qkv_input(True)
    try:
        message = r"^use_split_qkv_input / use_attn_in are not supported for Qwen3.5 blocks$"
        with pytest.raises(NotImplementedError, match=message):
            hooked(prompt(batch=1, length=3))
    finally:
        hooked.set_use_split_qkv_input(False)


def test_left_padded_batch_equals_separate_runs(hooked):
    """Padding is masked in full attention and zeroed before the conv / delta rule."""
    short, long = prompt(1, 6, seed=1), prompt(1, 10, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(10) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        padded = hooked(batch, attention_mask=mask)
        alone = [hooked(ids, attention_mask=torch.ones_like(ids)) for ids in (short, long)]
    torch.testing.assert_close(padded[0, 4:], alone[0][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1], alone[1][0], atol=ATOL, rtol=0)


def test_batched_generation_equals_one_prompt_at_a_time(hooked):
    """TransformerLens left-pads a list of prompts; the cached recurrent layers must ignore the pads."""
    prompts = ["hello there, how", "a"]
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert hooked.generate(prompts, **kwargs) == [hooked.generate(p, **kwargs) for p in prompts]


def test_cached_forward_continues_the_prompt(hooked):
    """Prompt, then single tokens (recurrent kernels), then a chunk: each equals the uncached run."""
    ids = prompt(batch=2, length=14, seed=3)
    cache = TransformerLensKeyValueCache.init_cache(hooked.cfg, "cpu", batch_size=2)
    with torch.no_grad():
        full = hooked(ids)
        steps = [(0, 8), (8, 9), (9, 10), (10, 14)]
        for start, stop in steps:
            chunk = ids[:, start:stop]  # the cache accumulates the attention mask itself
            out = hooked(chunk, past_kv_cache=cache, attention_mask=torch.ones_like(chunk))
            torch.testing.assert_close(out, full[:, start:stop], atol=ATOL, rtol=0, msg=f"positions {start}:{stop}")
        assert cache[0].past_keys.shape[1] == 0 and cache[0].qscope_recurrent_state.recurrent.shape == (2, 4, 16, 16)
        assert cache[1].past_keys.shape[1] == 14
        cache.freeze()
        state = cache[0].qscope_recurrent_state
        hooked(ids[:, :1], past_kv_cache=cache, attention_mask=torch.ones_like(ids[:, :1]))
        assert cache[0].qscope_recurrent_state is state and cache[1].past_keys.shape[1] == 14


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_steered_greedy_generation_equals_hf(hooked, hf, use_cache):
    ids = prompt(batch=1, length=7, seed=4)
    vector = 3.0 * torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(5))
    assert_steered_generation_matches_hf(hooked, hf, ids, STEER_LAYER, vector, max_new_tokens=10, use_cache=use_cache)


@pytest.mark.parametrize("cls", [HookedTransformer, HookedSAETransformer], ids=lambda c: c.__name__)
@pytest.mark.parametrize("source", ["hf_model", "text_dir", "multimodal_dir"])
def test_loading_routes_offline(checkpoints, hf, arch, source, cls, offline_hub):
    """No hub access (empty offline cache) for a pre-built model or a local directory."""
    if source == "hf_model":
        model = cls.from_pretrained_no_processing(NAMES[arch], hf_model=hf, tokenizer=tiny_tokenizer(), device="cpu")
    else:
        model = cls.from_pretrained_no_processing(str(checkpoints[source == "multimodal_dir"]), device="cpu")
    assert type(model) is cls and model.tokenizer is not None
    assert model.cfg.original_architecture == arch
    assert_matches_hf(model, hf, prompt(seed=6))


def test_default_processing_then_a_qwen_scope_sae(checkpoints, hf, tmp_path, offline_hub):
    """``from_pretrained`` (fold_ln refused, unembed centred) keeps the residual stream the SAE reads."""
    with pytest.warns(UserWarning, match="fold_ln is not supported"):
        model = HookedSAETransformer.from_pretrained(str(checkpoints[1]), device="cpu")
    ids = prompt(seed=9)
    assert_matches_hf(model, hf, ids, centered_logits=True)
    write_released_layer(tmp_path, STEER_LAYER, random_sae_state(hf.config.hidden_size, 256, seed=8))
    sae = qscope_plugins.load_sae(tmp_path, STEER_LAYER, k=8)
    hook = f"blocks.{STEER_LAYER}.hook_resid_post"
    with torch.no_grad():
        _, ref_layers = hf_layer_outputs(hf, ids)
        clean = model(ids)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about: the residual stream is HF's
            model.add_sae(sae, use_error_term=True)
        try:
            logits, cache = model.run_with_cache(ids)
        finally:
            model.reset_saes()
    torch.testing.assert_close(cache[f"{hook}.hook_sae_input"], ref_layers[STEER_LAYER], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, clean, atol=ATOL, rtol=0)  # the error term restores the output
    assert 0 < int(cache[f"{hook}.hook_sae_acts_post"].count_nonzero(-1).max()) <= 8


def test_bfloat16_model(arch, checkpoints, hf):
    """Every weight in bf16 (the experts too), and the first layer follows HF's bf16 run."""
    model = HookedTransformer.from_pretrained_no_processing(str(checkpoints[0]), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = prompt(batch=1, length=8, seed=10)
    hf_bf16 = tiny_model(arch).to(torch.bfloat16)
    with torch.no_grad():
        _, ref_layers = hf_layer_outputs(hf_bf16, ids)
        logits, cache = model.run_with_cache(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], ref_layers[0], atol=0.05, rtol=0)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert out.shape == (1, 11)
